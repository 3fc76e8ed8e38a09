//! Where each stored Responses API answer lives. A backend that stores responses (Ollama by
//! default, vLLM with its store on, OpenAI) keeps them in its own process: a request that
//! continues one (`previous_response_id`) or reads, cancels or deletes one
//! (`/v1/responses/{id}...`) must reach the backend that made it, and any other answers 404
//! `previous_response_not_found`. The gateway remembers the endpoint of each response id it
//! relayed, most recent first, and sends those requests there while it is available.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use memchr::memmem;

/// Response ids remembered: the most recent, ~100 bytes each.
pub const REMEMBERED: usize = 100_000;

/// The longest id taken from an answer (OpenAI's are ~50 characters).
const MAX_ID: usize = 128;

pub struct ResponseHomes {
    ids: Mutex<LruCache<Box<str>, usize>>,
}

impl std::fmt::Debug for ResponseHomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseHomes").finish_non_exhaustive()
    }
}

impl Default for ResponseHomes {
    fn default() -> Self {
        Self::new(REMEMBERED)
    }
}

impl ResponseHomes {
    pub fn new(capacity: usize) -> Self {
        Self {
            ids: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// The response `id` was made by the endpoint `endpoint`.
    pub fn remember(&self, id: &str, endpoint: usize) {
        self.lock().put(id.into(), endpoint);
    }

    /// The endpoint that made the response `id`, if remembered.
    pub fn home(&self, id: &str) -> Option<usize> {
        self.lock().get(id).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Box<str>, usize>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The response id in the first bytes of a Responses API answer: a response object's own `id`
/// (its first member as every server writes it), or, in a stream, the `response.created` event's
/// `response.id`, the first `"id"` there too.
pub fn response_id(first: &[u8]) -> Option<&str> {
    let at = memmem::find(first, b"\"id\"")? + 4;
    let rest = first[at..].trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
    // Ids are plain: one with an escape in it is not taken.
    let id = &rest[..memchr::memchr(b'"', rest)?];
    if id.is_empty() || id.len() > MAX_ID || id.contains(&b'\\') {
        return None;
    }
    std::str::from_utf8(id).ok()
}

/// The response id a request under `/v1/responses/{id}` (or `.../{id}/input_items`, `/cancel`)
/// is about.
pub fn id_in_path(path: &str) -> Option<&str> {
    let id = path
        .strip_prefix("/v1/responses/")?
        .split(['/', '?'])
        .next()?;
    (!id.is_empty() && id.len() <= MAX_ID).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_from_answers_and_events_and_paths() {
        assert_eq!(
            response_id(br#"{"id":"resp_67ccd2bed1ec","object":"response","output":[]}"#),
            Some("resp_67ccd2bed1ec")
        );
        assert_eq!(
            response_id(
                b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\": \"resp_1\",\"object\":\"response\"}}\n\n"
            ),
            Some("resp_1")
        );
        assert_eq!(response_id(br#"{"object":"response"}"#), None);
        assert_eq!(response_id(br#"{"id":""}"#), None);
        assert_eq!(response_id(br#"{"id":"a\"b"}"#), None);
        assert_eq!(id_in_path("/v1/responses/resp_1"), Some("resp_1"));
        assert_eq!(
            id_in_path("/v1/responses/resp_1/input_items"),
            Some("resp_1")
        );
        assert_eq!(id_in_path("/v1/responses"), None);
        assert_eq!(id_in_path("/v1/responses/"), None);
    }

    #[test]
    fn the_most_recent_ids_are_remembered() {
        let homes = ResponseHomes::new(2);
        homes.remember("a", 1);
        homes.remember("b", 2);
        assert_eq!(homes.home("a"), Some(1));
        homes.remember("c", 3);
        assert_eq!(homes.home("b"), None, "the least recently used went");
        assert_eq!((homes.home("a"), homes.home("c")), (Some(1), Some(3)));
    }
}
