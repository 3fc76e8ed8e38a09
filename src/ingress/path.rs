//! The path of a passed-through `/v1/*` request, made safe to forward. A backend, or a proxy in
//! front of it, may decode `%2e` and resolve `..` where the gateway matched the raw path, so
//! `/v1/../admin` or `/v1/%2e%2e/stats` would reach routes outside `/v1`. The path is normalised
//! here the way such a server would (dot segments resolved, `%2e` decoded, repeated slashes
//! merged) and refused when it leaves `/v1/`; encoded separators (`%2f`, `%5c`), backslashes and
//! control characters, which servers decode in different ways, are refused outright.

use crate::error::GatewayError;

/// Where every passed-through path must stay.
const PREFIX: &str = "/v1/";

/// The normalised form of `raw` (the path of a `method` request, without the query), or why it
/// is refused.
pub fn normalize_v1(method: &str, raw: &str) -> Result<String, GatewayError> {
    let bytes = raw.as_bytes();
    if bytes
        .iter()
        .any(|b| *b == b'\\' || b.is_ascii_control() || *b == b' ')
    {
        return Err(GatewayError::InvalidPath(
            "backslashes, spaces and control characters are not allowed",
        ));
    }
    let lower = raw.to_ascii_lowercase();
    if ["%2f", "%5c", "%00"].iter().any(|e| lower.contains(e)) {
        return Err(GatewayError::InvalidPath(
            "encoded slashes, backslashes and NUL are not allowed",
        ));
    }
    let mut segments: Vec<String> = Vec::new();
    for segment in raw.split('/').filter(|s| !s.is_empty()) {
        let decoded = decode_dots(segment);
        match decoded.as_str() {
            "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment.to_string()),
        }
    }
    let mut path = String::with_capacity(raw.len());
    for segment in &segments {
        path.push('/');
        path.push_str(segment);
    }
    if raw.ends_with('/') || raw.ends_with("/.") || raw.ends_with("/..") {
        path.push('/');
    }
    if !path.starts_with(PREFIX) {
        return Err(GatewayError::UnknownRoute {
            method: method.to_string(),
            path: path_for_message(raw),
        });
    }
    Ok(path)
}

/// A segment with `%2e` decoded, to recognise `.` and `..` however they are spelled.
fn decode_dots(segment: &str) -> String {
    let lower = segment.to_ascii_lowercase();
    lower.replace("%2e", ".")
}

/// The raw path as the error message quotes it, bounded.
fn path_for_message(raw: &str) -> String {
    raw.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_v1_pass_normalised() {
        assert_eq!(normalize_v1("GET", "/v1/files").unwrap(), "/v1/files");
        assert_eq!(
            normalize_v1("GET", "/v1//files/./x").unwrap(),
            "/v1/files/x"
        );
        assert_eq!(normalize_v1("GET", "/v1/a/../files").unwrap(), "/v1/files");
        assert_eq!(normalize_v1("GET", "/v1/files/").unwrap(), "/v1/files/");
        assert_eq!(normalize_v1("GET", "/v1/a%20b").unwrap(), "/v1/a%20b");
    }

    #[test]
    fn paths_leaving_v1_or_hiding_separators_are_refused() {
        for raw in [
            "/v1/../admin/endpoints",
            "/v1/%2e%2e/stats",
            "/v1/%2E%2E/%2e%2e/metrics",
            "/v1/.%2e/health",
            "/v1/..",
            "/v1",
        ] {
            assert!(
                matches!(
                    normalize_v1("POST", raw),
                    Err(GatewayError::UnknownRoute { .. })
                ),
                "{raw}"
            );
        }
        for raw in [
            "/v1/..%2fadmin",
            "/v1/%2F..%2Fadmin",
            "/v1/a%5c..",
            "/v1/a\\..\\admin",
            "/v1/a%00",
        ] {
            assert!(
                matches!(normalize_v1("POST", raw), Err(GatewayError::InvalidPath(_))),
                "{raw}"
            );
        }
    }
}
