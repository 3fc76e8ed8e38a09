//! The usage report's SQL, shared by both dialects (only the placeholders differ), and what is
//! done to its rows in Rust: the hour's rendering and the order, which would otherwise depend on
//! each database's collation and NULL ordering.

use super::{GroupBy, UsageQuery, UsageRow};

const HOUR_MS: i64 = 3_600_000;

/// A report filter's value.
pub(super) enum Param {
    Text(String),
    Int(i64),
}

/// The report's SQL and its parameters, in placeholder order. Its columns: the group (an integer
/// for hours, text otherwise, a constant when ungrouped), then requests, errors, prompt,
/// completion and cached tokens, estimated requests, cache hits (all integers), then the p50 and
/// p99 latency and p50 time to first token (nullable doubles).
///
/// Percentiles are by nearest rank: the value ranked ceil(p·n) in its group, in integer
/// arithmetic (`(n*p+99)/100`) because SQLite has no `CEIL` unless built with its math functions.
pub(super) fn sql(query: &UsageQuery, placeholder: fn(usize) -> String) -> (String, Vec<Param>) {
    let group = match query.group_by {
        None => "0".to_owned(),
        Some(GroupBy::Key) => "api_key".to_owned(),
        Some(GroupBy::Model) => "model".to_owned(),
        Some(GroupBy::Endpoint) => "endpoint".to_owned(),
        Some(GroupBy::Hour) => format!("(at_ms / {HOUR_MS}) * {HOUR_MS}"),
    };
    let mut filters = Vec::new();
    let mut params = Vec::new();
    let mut filter = |condition: &str, param: Param| {
        params.push(param);
        filters.push(format!("{condition} {}", placeholder(params.len())));
    };
    if let Some(key) = &query.key {
        filter("api_key =", Param::Text(key.clone()));
    }
    if let Some(model) = &query.model {
        filter("model =", Param::Text(model.clone()));
    }
    if let Some(since) = query.since_ms {
        filter("at_ms >=", Param::Int(since));
    }
    if let Some(until) = query.until_ms {
        filter("at_ms <", Param::Int(until));
    }
    let filters = if filters.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", filters.join(" AND "))
    };
    let sql = format!(
        "WITH matching AS (
             SELECT {group} AS g, status, prompt_tokens, completion_tokens, cached_tokens,
                    estimated, cache_hit, latency_ms, ttft_ms
             FROM usage_log {filters}
         ), ranked AS (
             SELECT matching.*,
                    ROW_NUMBER() OVER (PARTITION BY g ORDER BY latency_ms) AS rn,
                    COUNT(*) OVER (PARTITION BY g) AS n,
                    ROW_NUMBER() OVER (PARTITION BY g ORDER BY ttft_ms NULLS LAST) AS ttft_rn,
                    COUNT(ttft_ms) OVER (PARTITION BY g) AS ttft_n
             FROM matching
         )
         SELECT g,
                COUNT(*),
                CAST(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS BIGINT),
                CAST(SUM(prompt_tokens) AS BIGINT),
                CAST(SUM(completion_tokens) AS BIGINT),
                CAST(SUM(cached_tokens) AS BIGINT),
                CAST(SUM(CASE WHEN estimated THEN 1 ELSE 0 END) AS BIGINT),
                CAST(SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END) AS BIGINT),
                MAX(CASE WHEN rn = (n * 50 + 99) / 100 THEN latency_ms END),
                MAX(CASE WHEN rn = (n * 99 + 99) / 100 THEN latency_ms END),
                MAX(CASE WHEN ttft_rn = (ttft_n * 50 + 99) / 100 THEN ttft_ms END)
         FROM ranked
         GROUP BY g"
    );
    (sql, params)
}

/// Sorts the rows by group, and gives an ungrouped report its one row when nothing matched.
pub(super) fn finish(query: &UsageQuery, mut rows: Vec<UsageRow>) -> Vec<UsageRow> {
    if query.group_by.is_none() && rows.is_empty() {
        rows.push(UsageRow::default());
    }
    rows.sort_by(|a, b| a.group.cmp(&b.group));
    rows
}

/// Unix milliseconds as RFC 3339 UTC, `2026-11-28T01:00:00Z`: the hour groups' label, which
/// also sorts as the hours do.
pub(super) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, second_of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
    );
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`): eras of 400 years, years starting in March so the leap day comes last.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_hours_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_827_600_000), "2026-11-28T01:00:00Z");
        assert_eq!(rfc3339(1_709_247_600_000), "2024-02-29T23:00:00Z");
        assert_eq!(
            rfc3339(1_709_247_600_000 + 3_600_000),
            "2024-03-01T00:00:00Z"
        );
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn numbers_placeholders_in_filter_order() {
        let query = UsageQuery {
            key: Some("k".into()),
            since_ms: Some(5),
            until_ms: Some(9),
            ..UsageQuery::default()
        };
        let (sql, params) = sql(&query, |n| format!("${n}"));
        assert!(sql.contains("WHERE api_key = $1 AND at_ms >= $2 AND at_ms < $3"));
        assert!(matches!(
            params.as_slice(),
            [Param::Text(_), Param::Int(5), Param::Int(9)]
        ));
    }
}
