//! The access tokens a server accepts, and reloading them on SIGHUP.
//!
//! Tokens come from `auth_token` (flag, environment or file), the file's
//! `auth_tokens` list and the lines of `auth_token_file`; every one of them
//! is accepted, so an operator rotates by adding the new token, moving the
//! clients over, then removing the old one, each step followed by SIGHUP.
//! A reload reads the configuration file and the token file again; if
//! either fails, or production mode refuses a token, the tokens in use stay
//! as they are and the reason is logged (never a token).  Connections
//! already authenticated are not affected by a reload.

use std::path::Path;

use crate::config::{Config, DEV_AUTH_TOKEN, Mode, Secret};
use crate::error::ServerError;
use crate::production;

/// Largest token file read: far more than any list of tokens needs.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// The tokens of `config`, in order: `auth_token`, `auth_tokens`, then
/// the lines of `auth_token_file` (read now).  Empty values are skipped
/// (an empty `auth_token` means "not set"); a token file that cannot be
/// read or holds no token is an error.
pub fn configured_tokens(config: &Config) -> Result<Vec<Secret>, ServerError> {
    let mut tokens: Vec<Secret> = config
        .auth_token
        .iter()
        .chain(&config.auth_tokens)
        .filter(|t| !t.0.is_empty())
        .cloned()
        .collect();
    if let Some(path) = &config.auth_token_file {
        let from_file = read_token_file(path)?;
        if from_file.is_empty() {
            return Err(ServerError::Config(crate::config::ConfigError::Invalid {
                setting: "auth_token_file",
                reason: format!("{} holds no token", path.display()),
            }));
        }
        tokens.extend(from_file);
    }
    Ok(tokens)
}

/// The tokens of a token file: one a line, the line ending removed; blank
/// lines and lines starting with `#` are skipped.  Whatever else a line
/// holds is the token (production mode refuses whitespace around it).
fn read_token_file(path: &Path) -> Result<Vec<Secret>, ServerError> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|source| ServerError::File {
            what: "the access token file",
            path: path.display().to_string(),
            source,
        })?;
    if u64::try_from(text.len()).unwrap_or(u64::MAX) > MAX_TOKEN_FILE_BYTES {
        return Err(ServerError::Config(crate::config::ConfigError::Invalid {
            setting: "auth_token_file",
            reason: format!("{} is larger than 64 KiB", path.display()),
        }));
    }
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| Secret(l.to_string()))
        .collect())
}

/// The tokens the server accepts under `config`: the configured ones, each
/// passing production mode's checks there; in development mode, the public
/// development token when none is configured (with a warning, as when one
/// of them is the development token).
pub fn accepted_tokens(config: &Config) -> Result<Vec<Secret>, ServerError> {
    let tokens = configured_tokens(config)?;
    if config.mode == Mode::Production {
        if tokens.is_empty() {
            return Err(ServerError::Production {
                setting: "auth_token",
                reason: "not set (QUICNPROTOCHAT_AUTH_TOKEN, auth_tokens or auth_token_file)"
                    .into(),
            });
        }
        for (i, t) in tokens.iter().enumerate() {
            if let Some(problem) = production::token_problem(&t.0) {
                return Err(ServerError::Production {
                    setting: "auth_token",
                    reason: format!("access token {} of {}: {problem}", i + 1, tokens.len()),
                });
            }
        }
        return Ok(tokens);
    }
    if tokens.is_empty() {
        tracing::warn!(
            "DEVELOPMENT SHORTCUT: no access token configured; using the public development token {DEV_AUTH_TOKEN:?}"
        );
        return Ok(vec![Secret(DEV_AUTH_TOKEN.into())]);
    }
    if tokens.iter().any(|t| t.0 == DEV_AUTH_TOKEN) {
        tracing::warn!("DEVELOPMENT SHORTCUT: an access token is the public development token");
    }
    Ok(tokens)
}

/// SHA-256 of each token: what the service compares presented tokens with.
pub(crate) fn hashes(tokens: &[Secret]) -> Vec<[u8; 32]> {
    tokens
        .iter()
        .map(|t| {
            let mut h = [0; 32];
            h.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, t.0.as_bytes()).as_ref());
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_every_source_and_a_bad_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# rotation\nfrom-file-1\n\nfrom-file-2\n").unwrap();
        let mut c = Config::development(dir.path());
        c.auth_token = Some(Secret("single".into()));
        c.auth_tokens = vec![Secret("listed".into()), Secret(String::new())];
        c.auth_token_file = Some(file.clone());
        let got: Vec<String> = configured_tokens(&c)
            .unwrap()
            .into_iter()
            .map(|t| t.0)
            .collect();
        assert_eq!(got, ["single", "listed", "from-file-1", "from-file-2"]);

        std::fs::write(&file, "# nothing\n\n").unwrap();
        let err = configured_tokens(&c).unwrap_err().to_string();
        assert!(err.contains("holds no token"), "{err}");
        std::fs::remove_file(&file).unwrap();
        assert!(configured_tokens(&c).is_err());
    }

    #[test]
    fn production_checks_every_token_and_never_names_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::development(dir.path());
        c.mode = Mode::Production;
        let good = "g".repeat(40);
        c.auth_tokens = vec![Secret(good.clone()), Secret("short-secret".into())];
        let err = accepted_tokens(&c).unwrap_err().to_string();
        assert!(
            err.contains("token 2 of 2") && err.contains("shorter"),
            "{err}"
        );
        assert!(!err.contains("short-secret"), "{err}");
        c.auth_tokens = vec![Secret(good.clone())];
        assert_eq!(accepted_tokens(&c).unwrap(), [Secret(good)]);
        c.auth_tokens.clear();
        assert!(accepted_tokens(&c).is_err());
        c.mode = Mode::Development;
        assert_eq!(
            accepted_tokens(&c).unwrap(),
            [Secret(DEV_AUTH_TOKEN.into())]
        );
    }
}
