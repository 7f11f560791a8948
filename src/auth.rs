//! Optional proxy authentication: `Proxy-Authorization: Basic`, checked against a users file of
//! bcrypt (`htpasswd -B`) or argon2 (PHC string) hashes.
//!
//! A password hash costs tens of milliseconds by design, which would cap tunnel set-up at a few
//! dozen per second per core. So a successful check is remembered as a keyed SHA-256 digest of
//! the password (the key is random per process; no password is kept or ever logged), compared
//! in constant time. Failures are never remembered, and hash checks run on the blocking pool,
//! at most [`MAX_CONCURRENT_HASHES`] at a time, so a flood of wrong passwords costs the
//! attacker time, not the proxy its event loop.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

/// Password hash checks running at once.
pub const MAX_CONCURRENT_HASHES: usize = 2;

/// The realm clients are told in `Proxy-Authenticate`.
pub const REALM: &str = "portcullis";

/// A users file: name → hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersFile {
    pub users: HashMap<String, String>,
}

impl UsersFile {
    /// Parses `name:hash` lines; `#` comments and blank lines are skipped.
    pub fn load(path: &Path) -> Result<UsersFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("users file {}: {e}", path.display()))?;
        UsersFile::parse(&text).map_err(|e| format!("users file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<UsersFile, String> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("line {}", index + 1);
            let (name, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("{}: expected name:hash", at()))?;
            if name.is_empty() {
                return Err(format!("{}: empty user name", at()));
            }
            if !(hash.starts_with("$2") || hash.starts_with("$argon2")) {
                return Err(format!(
                    "{}: the hash for {name:?} is neither bcrypt ($2y$...) nor argon2 ($argon2id$...)",
                    at()
                ));
            }
            if users.insert(name.to_string(), hash.to_string()).is_some() {
                return Err(format!("{}: user {name:?} appears twice", at()));
            }
        }
        Ok(UsersFile { users })
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Proxy-Authorization`, or not Basic.
    Missing,
    /// Credentials present but wrong (or unknown user).
    Invalid,
}

/// The credential checker of one config.
pub struct Authenticator {
    users: Arc<HashMap<String, String>>,
    /// user → digest of the last password that verified for them.
    verified: DashMap<String, [u8; 32]>,
    key: [u8; 32],
    hashing: Arc<Semaphore>,
}

impl Authenticator {
    pub fn new(file: &UsersFile) -> Authenticator {
        let mut key = [0u8; 32];
        getrandom_key(&mut key);
        Authenticator {
            users: Arc::new(file.users.clone()),
            verified: DashMap::new(),
            key,
            hashing: Arc::new(Semaphore::new(MAX_CONCURRENT_HASHES)),
        }
    }

    /// Checks a `Proxy-Authorization` header value; returns the user name.
    pub async fn check(&self, header: Option<&[u8]>) -> Result<String, Denied> {
        let (user, password) = parse_basic(header.ok_or(Denied::Missing)?)?;
        let Some(hash) = self.users.get(&user).cloned() else {
            return Err(Denied::Invalid);
        };
        let digest = self.digest(&user, &password);
        if let Some(known) = self.verified.get(&user)
            && bool::from(known.ct_eq(&digest))
        {
            return Ok(user);
        }
        let _permit = self.hashing.acquire().await.map_err(|_| Denied::Invalid)?;
        let ok = tokio::task::spawn_blocking(move || verify(&password, &hash))
            .await
            .unwrap_or(false);
        if !ok {
            return Err(Denied::Invalid);
        }
        self.verified.insert(user.clone(), digest);
        Ok(user)
    }

    fn digest(&self, user: &str, password: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.key);
        hasher.update(user.as_bytes());
        hasher.update([0]);
        hasher.update(password.as_bytes());
        hasher.finalize().into()
    }
}

fn verify(password: &str, hash: &str) -> bool {
    if hash.starts_with("$argon2") {
        use argon2::password_hash::PasswordVerifier;
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), hash)
            .is_ok()
    } else {
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

/// `Basic base64(user:password)`.
fn parse_basic(value: &[u8]) -> Result<(String, String), Denied> {
    let value = std::str::from_utf8(value).map_err(|_| Denied::Invalid)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(Denied::Missing)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Denied::Missing);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .map_err(|_| Denied::Invalid)?;
    let decoded = String::from_utf8(decoded).map_err(|_| Denied::Invalid)?;
    let (user, password) = decoded.split_once(':').ok_or(Denied::Invalid)?;
    Ok((user.to_string(), password.to_string()))
}

/// A per-process key, so cached digests mean nothing outside this process. Taken from the
/// kernel's random source; the hash crates depend on the same one.
fn getrandom_key(key: &mut [u8; 32]) {
    use std::io::Read;
    if let Ok(mut random) = std::fs::File::open("/dev/urandom")
        && random.read_exact(key).is_ok()
    {
        return;
    }
    // No /dev/urandom: fall back to something unpredictable enough for a cache key.
    let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
    key.copy_from_slice(&Sha256::digest(seed.as_bytes()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> Vec<u8> {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {token}").into_bytes()
    }

    #[tokio::test]
    async fn bcrypt_and_argon2_users() {
        use argon2::password_hash::PasswordHasher;
        let bcrypt_hash = bcrypt::hash("s3cret", 4).unwrap();
        let argon_hash = argon2::Argon2::default()
            .hash_password(b"hunter2")
            .unwrap()
            .to_string();
        let file =
            UsersFile::parse(&format!("# users\nalice:{bcrypt_hash}\nbob:{argon_hash}\n")).unwrap();
        let auth = Authenticator::new(&file);
        assert_eq!(
            auth.check(Some(&header("alice", "s3cret"))).await,
            Ok("alice".into())
        );
        // Second time from the cache, same answer.
        assert_eq!(
            auth.check(Some(&header("alice", "s3cret"))).await,
            Ok("alice".into())
        );
        assert_eq!(
            auth.check(Some(&header("alice", "wrong"))).await,
            Err(Denied::Invalid)
        );
        assert_eq!(
            auth.check(Some(&header("bob", "hunter2"))).await,
            Ok("bob".into())
        );
        assert_eq!(
            auth.check(Some(&header("carol", "x"))).await,
            Err(Denied::Invalid)
        );
        assert_eq!(auth.check(None).await, Err(Denied::Missing));
        assert_eq!(auth.check(Some(b"Bearer abc")).await, Err(Denied::Missing));
        assert_eq!(auth.check(Some(b"Basic !!!")).await, Err(Denied::Invalid));
    }

    #[test]
    fn users_file_errors_name_the_line() {
        assert!(UsersFile::parse("alice").unwrap_err().contains("line 1"));
        assert!(
            UsersFile::parse("\nalice:plain")
                .unwrap_err()
                .contains("line 2")
        );
        let dup = "a:$2y$04$x\na:$2y$04$y\n";
        assert!(UsersFile::parse(dup).unwrap_err().contains("twice"));
    }
}
