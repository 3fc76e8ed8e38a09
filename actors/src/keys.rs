//! API keys: what a key may do ([`KeyLimits`], its models), how it is stored ([`StoredKey`]:
//! only its secret's SHA-256), and the [`KeyRegistry`] the request path authenticates against.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::limiter::{MemoryLimits, SharedLimits};

/// A key's limits; `None` is no limit. Zero is refused where limits are set (config, admin API):
/// a key that may do nothing is a revoked key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute, charged when the answer's usage is known.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u64>,
    /// Tokens per UTC day.
    pub daily_tokens: Option<u64>,
}

/// A key as the database keeps it: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// Unique among keys; what the usage log and the admin API name it by.
    pub name: String,
    pub secret_sha256: [u8; 32],
    /// Models it may use; empty: all.
    pub models: Vec<String>,
    pub limits: KeyLimits,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// Where a key was defined: the config's (`[[keys]]`, changed only by editing it) or the admin
/// API's (kept in the database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    Config,
    Admin,
}

/// A key as the request path sees it.
pub struct ApiKey {
    pub name: Arc<str>,
    digest: [u8; 32],
    pub models: Vec<String>,
    pub limits: KeyLimits,
    pub limiter: SharedLimits,
    pub source: KeySource,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

impl ApiKey {
    pub fn new(stored: StoredKey, source: KeySource) -> Self {
        Self {
            name: stored.name.into(),
            digest: stored.secret_sha256,
            models: stored.models,
            limits: stored.limits,
            limiter: Arc::new(MemoryLimits::new(stored.limits)),
            source,
            created_ms: stored.created_ms,
            revoked_ms: stored.revoked_ms,
        }
    }

    /// Whether it may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    pub fn info(&self) -> KeyInfo {
        KeyInfo {
            name: self.name.to_string(),
            models: self.models.clone(),
            limits: self.limits,
            source: self.source,
            created_ms: self.created_ms,
            revoked_ms: self.revoked_ms,
        }
    }
}

/// A key as the admin API lists it: never its secret.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyInfo {
    pub name: String,
    pub models: Vec<String>,
    pub limits: KeyLimits,
    pub source: KeySource,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a key named '{0}' exists already")]
    NameTaken(String),
    #[error("no key named '{0}'")]
    Unknown(String),
    #[error("the key named '{0}' is defined in the config file; change it there")]
    FromConfig(String),
}

/// Every key, published for the request path to read without a lock; changes (admin API) copy
/// the map, which is fine for the handful of changes a day it sees.
#[derive(Default)]
pub struct KeyRegistry {
    /// Unrevoked keys by the first 8 bytes of their secret's SHA-256.
    active: ArcSwap<HashMap<u64, Arc<ApiKey>>>,
    /// Every key by name, revoked ones too (for the admin API and the usage log's names).
    all: ArcSwap<HashMap<Arc<str>, Arc<ApiKey>>>,
    writes: Mutex<()>,
    /// Bumped by every change, so that a remembered authentication knows when to look again.
    generation: AtomicU64,
}

/// The last key one client connection authenticated with: a keep-alive connection sends the same
/// secret request after request, and comparing it with the last one costs less than a digest.
#[derive(Debug, Default)]
pub struct LastKey(RefCell<Option<Remembered>>);

/// A secret, the key it belongs to, and the registry's generation when that was found.
#[derive(Debug)]
struct Remembered {
    secret: Vec<u8>,
    key: Arc<ApiKey>,
    generation: u64,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey").field("name", &self.name).finish()
    }
}

impl KeyRegistry {
    /// [`KeyRegistry::authenticate`], remembering the result on the connection: the same
    /// secret (compared in constant time) with no change to the keys since is the same key.
    pub fn authenticate_on(&self, secret: &[u8], last: &LastKey) -> Option<Arc<ApiKey>> {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(known) = &*last.0.borrow() {
            if known.generation == generation && bool::from(known.secret.as_slice().ct_eq(secret)) {
                return Some(known.key.clone());
            }
        }
        let key = self.authenticate(secret)?;
        *last.0.borrow_mut() = Some(Remembered {
            secret: secret.to_vec(),
            key: key.clone(),
            generation,
        });
        Some(key)
    }

    /// The key `secret` belongs to, if it is a known unrevoked key. The map is searched by a
    /// prefix of the secret's digest (which says nothing usable about the secret), and the whole
    /// digest is then compared in constant time.
    pub fn authenticate(&self, secret: &[u8]) -> Option<Arc<ApiKey>> {
        let digest = digest(secret);
        let key = self.active.load().get(&prefix(&digest)).cloned()?;
        constant_time_eq(&key.digest, &digest).then_some(key)
    }

    pub fn get(&self, name: &str) -> Option<Arc<ApiKey>> {
        self.all.load().get(name).cloned()
    }

    pub fn list(&self) -> Vec<KeyInfo> {
        let mut keys: Vec<KeyInfo> = self.all.load().values().map(|k| k.info()).collect();
        keys.sort_by(|a, b| a.name.cmp(&b.name));
        keys
    }

    pub fn is_empty(&self) -> bool {
        self.all.load().is_empty()
    }

    /// Adds a key (a revoked one only to the list).
    pub fn insert(&self, key: ApiKey) -> Result<(), KeyError> {
        self.add(key, false)
    }

    /// Adds a key the admin API just wrote to the database, unless the periodic [`sync`]
    /// (another thread) read it from there first: the same name and secret, already in.
    ///
    /// [`sync`]: Self::sync
    pub fn insert_made(&self, key: ApiKey) -> Result<(), KeyError> {
        self.add(key, true)
    }

    fn add(&self, key: ApiKey, same_is_in: bool) -> Result<(), KeyError> {
        let _writing = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let all = self.all.load();
        if let Some(known) = all.get(&key.name) {
            if same_is_in && constant_time_eq(&known.digest, &key.digest) {
                return Ok(());
            }
            return Err(KeyError::NameTaken(key.name.to_string()));
        }
        let key = Arc::new(key);
        if key.revoked_ms.is_none() {
            let mut active = HashMap::clone(&self.active.load());
            if active.contains_key(&prefix(&key.digest)) {
                return Err(KeyError::NameTaken(format!(
                    "{} (its secret is another key's)",
                    key.name
                )));
            }
            active.insert(prefix(&key.digest), key.clone());
            self.active.store(Arc::new(active));
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        let mut all = HashMap::clone(&all);
        all.insert(key.name.clone(), key);
        self.all.store(Arc::new(all));
        Ok(())
    }

    /// Brings the admin API's keys in line with the database's (where another gateway sharing it
    /// may have made, changed or revoked one); returns how many keys changed.
    pub fn sync(&self, stored: Vec<StoredKey>) -> usize {
        let mut changed = 0;
        for key in stored {
            let known = self.get(&key.name);
            let result = match known {
                None => self.insert(ApiKey::new(key, KeySource::Admin)),
                Some(old) if old.source == KeySource::Config || old.revoked_ms.is_some() => {
                    continue
                }
                Some(_) if key.revoked_ms.is_some() => self
                    .revoke(&key.name, key.revoked_ms.unwrap_or_default())
                    .map(drop),
                Some(old) if old.models != key.models || old.limits != key.limits => {
                    self.update(&key.name, key.models, key.limits).map(drop)
                }
                Some(_) => continue,
            };
            match result {
                Ok(()) => changed += 1,
                Err(e) => log::warn!("keys: a stored key is not used: {e}"),
            }
        }
        changed
    }

    /// Replaces an admin key's models and limits; changed limits start their counters afresh.
    pub fn update(
        &self,
        name: &str,
        models: Vec<String>,
        limits: KeyLimits,
    ) -> Result<KeyInfo, KeyError> {
        self.replace(name, |old| ApiKey {
            name: old.name.clone(),
            digest: old.digest,
            models,
            limits,
            // The same limits keep their counters (a change of models must not reset a spent
            // budget); new limits start afresh.
            limiter: if limits == old.limits {
                old.limiter.clone()
            } else {
                Arc::new(MemoryLimits::new(limits))
            },
            source: old.source,
            created_ms: old.created_ms,
            revoked_ms: None,
        })
    }

    /// Revokes an admin key: from now on it is refused.
    pub fn revoke(&self, name: &str, at_ms: i64) -> Result<KeyInfo, KeyError> {
        self.replace(name, |old| ApiKey {
            name: old.name.clone(),
            digest: old.digest,
            models: old.models.clone(),
            limits: old.limits,
            limiter: old.limiter.clone(),
            source: old.source,
            created_ms: old.created_ms,
            revoked_ms: Some(at_ms),
        })
    }

    fn replace(
        &self,
        name: &str,
        new: impl FnOnce(&ApiKey) -> ApiKey,
    ) -> Result<KeyInfo, KeyError> {
        let _writing = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let old = match self.all.load().get(name) {
            Some(old) if old.revoked_ms.is_none() => old.clone(),
            _ => return Err(KeyError::Unknown(name.to_string())),
        };
        if old.source == KeySource::Config {
            return Err(KeyError::FromConfig(name.to_string()));
        }
        let key = Arc::new(new(&old));
        let mut active = HashMap::clone(&self.active.load());
        active.remove(&prefix(&old.digest));
        if key.revoked_ms.is_none() {
            active.insert(prefix(&key.digest), key.clone());
        }
        self.active.store(Arc::new(active));
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut all = HashMap::clone(&self.all.load());
        all.insert(key.name.clone(), key.clone());
        self.all.store(Arc::new(all));
        Ok(key.info())
    }
}

/// The SHA-256 of a secret: what is stored and compared, never the secret.
pub fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

fn prefix(digest: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Equality whose time does not depend on where two digests differ.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// A new secret: `ng-` and 32 random bytes in hex (256 bits, like OpenAI's project keys).
pub fn new_secret() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes: [u8; 32] = rand::random();
    let mut secret = String::with_capacity(3 + 64);
    secret.push_str("ng-");
    for byte in bytes {
        secret.push(HEX[usize::from(byte >> 4)] as char);
        secret.push(HEX[usize::from(byte & 0xf)] as char);
    }
    secret
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(name: &str, secret: &str) -> StoredKey {
        StoredKey {
            name: name.into(),
            secret_sha256: digest(secret.as_bytes()),
            models: vec!["m".into()],
            limits: KeyLimits::default(),
            created_ms: 0,
            revoked_ms: None,
        }
    }

    #[test]
    fn constant_time_comparison_tells_equal_from_different_anywhere() {
        let a = digest(b"secret");
        assert!(constant_time_eq(&a, &digest(b"secret")));
        for i in [0, 15, 31] {
            let mut b = a;
            b[i] ^= 1;
            assert!(!constant_time_eq(&a, &b), "differs at byte {i}");
        }
    }

    #[test]
    fn a_key_is_found_by_its_secret_only_and_refused_once_revoked() {
        let registry = KeyRegistry::default();
        registry
            .insert(ApiKey::new(stored("team-a", "ng-a"), KeySource::Admin))
            .unwrap();
        assert_eq!(&*registry.authenticate(b"ng-a").unwrap().name, "team-a");
        assert!(registry.authenticate(b"ng-b").is_none());
        assert!(registry.authenticate(b"").is_none());
        registry.revoke("team-a", 5).unwrap();
        assert!(registry.authenticate(b"ng-a").is_none());
        assert_eq!(registry.list()[0].revoked_ms, Some(5));
        assert_eq!(
            registry.revoke("team-a", 6).unwrap_err(),
            KeyError::Unknown("team-a".into())
        );
    }

    #[test]
    fn names_are_unique_and_config_keys_are_changed_in_the_config() {
        let registry = KeyRegistry::default();
        registry
            .insert(ApiKey::new(stored("ops", "ng-1"), KeySource::Config))
            .unwrap();
        assert!(matches!(
            registry.insert(ApiKey::new(stored("ops", "ng-2"), KeySource::Admin)),
            Err(KeyError::NameTaken(_))
        ));
        assert_eq!(
            registry.revoke("ops", 1).unwrap_err(),
            KeyError::FromConfig("ops".into())
        );
        // A key the admin API made, which the sync took in from the database first: in once.
        assert_eq!(registry.sync(vec![stored("made", "ng-made")]), 1);
        registry
            .insert_made(ApiKey::new(stored("made", "ng-made"), KeySource::Admin))
            .unwrap();
        assert!(matches!(
            registry.insert_made(ApiKey::new(stored("made", "ng-other"), KeySource::Admin)),
            Err(KeyError::NameTaken(_))
        ));
        assert_eq!(registry.list().len(), 2);
    }

    #[test]
    fn sync_takes_what_another_gateway_made_changed_or_revoked() {
        let registry = KeyRegistry::default();
        registry
            .insert(ApiKey::new(stored("ops", "ng-1"), KeySource::Config))
            .unwrap();
        registry
            .insert(ApiKey::new(stored("a", "ng-a"), KeySource::Admin))
            .unwrap();
        let mut changed = stored("a", "ng-a");
        changed.limits.rpm = Some(5);
        let revoked = StoredKey {
            revoked_ms: Some(9),
            ..stored("b", "ng-b")
        };
        let ops = StoredKey {
            revoked_ms: Some(9),
            ..stored("ops", "ng-1")
        };
        assert_eq!(registry.sync(vec![changed, revoked, ops]), 2);
        assert_eq!(registry.get("a").unwrap().limits.rpm, Some(5));
        assert!(registry.authenticate(b"ng-b").is_none());
        assert!(
            registry.authenticate(b"ng-1").is_some(),
            "config keys are the config's"
        );
        let gone = StoredKey {
            revoked_ms: Some(10),
            ..stored("a", "ng-a")
        };
        assert_eq!(registry.sync(vec![gone]), 1);
        assert!(registry.authenticate(b"ng-a").is_none());
    }

    #[test]
    fn a_remembered_key_is_looked_up_again_after_any_change() {
        let registry = KeyRegistry::default();
        registry
            .insert(ApiKey::new(stored("a", "ng-a"), KeySource::Admin))
            .unwrap();
        let last = LastKey::default();
        assert!(registry.authenticate_on(b"ng-a", &last).is_some());
        assert!(registry.authenticate_on(b"ng-a", &last).is_some());
        assert!(registry.authenticate_on(b"ng-b", &last).is_none());
        assert!(registry.authenticate_on(b"ng-a", &last).is_some());
        registry.revoke("a", 1).unwrap();
        assert!(
            registry.authenticate_on(b"ng-a", &last).is_none(),
            "revoked at once"
        );
    }

    #[test]
    fn new_secrets_differ_and_look_alike() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 67);
        assert!(a.starts_with("ng-"));
    }
}
