//! The production-mode gate.
//!
//! In production mode the server refuses to start, with one line naming the
//! setting, unless every secret is real: an access token of at least 32 bytes
//! that is not the development token nor any value shown in the
//! documentation (judged after trimming whitespace) and has no whitespace
//! around it; a database key (encryption on) that is not one repeated byte
//! such as all zeros; certificate and key files
//! that load, match each other and are within their validity period; a
//! writable data directory.  In development mode the same shortcuts are
//! allowed and each one in use is logged as a warning at start-up.

use std::path::Path;

use crate::config::{Config, DEV_AUTH_TOKEN, DbKeySetting};
use crate::error::ServerError;

/// Shortest access token production mode accepts: 32 bytes, i.e. 256 bits
/// when random.
pub const MIN_PRODUCTION_TOKEN_LEN: usize = 32;

/// Every token value that appears in the README, the example configuration
/// or the operator documentation.  Production refuses them all; the test
/// `production::documented_tokens_are_refused` scans the documents and fails
/// when one shows a value missing here.
pub const EXAMPLE_TOKENS: &[&str] = &[
    DEV_AUTH_TOKEN,
    "<openssl rand -base64 48>",
    "…at least 32 bytes…",
    "REPLACE-WITH-THE-OUTPUT-OF-openssl-rand-base64-48",
];

fn refuse(setting: &'static str, reason: impl Into<String>) -> ServerError {
    ServerError::Production {
        setting,
        reason: reason.into(),
    }
}

/// Whether `c` is whitespace, ASCII or Unicode, or an invisible character a
/// text editor or a copy may leave around a value (a byte-order mark, a
/// zero-width space or joiner).
fn is_padding(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '\u{200b}' | '\u{200c}' | '\u{200d}' | '\u{2060}' | '\u{feff}'
        )
}

/// Why production mode refuses `token`, if it does.  The value is judged
/// after trimming whitespace, so `"devtoken "` is refused as the development
/// token and a documented example with a newline after it as that example;
/// a token that passes those checks is then refused for the whitespace
/// itself, which is never part of a real token (it is the final newline of
/// a token file, or a slip when copying).  The reason never contains the
/// token.
pub fn token_problem(token: &str) -> Option<&'static str> {
    let trimmed = token.trim_matches(is_padding);
    if token.is_empty() {
        Some("is empty")
    } else if trimmed.is_empty() {
        Some("is empty apart from whitespace")
    } else if trimmed == DEV_AUTH_TOKEN {
        Some("is the public development token")
    } else if EXAMPLE_TOKENS.contains(&trimmed) {
        Some("is an example value from the documentation")
    } else if trimmed.len() < MIN_PRODUCTION_TOKEN_LEN {
        Some("is shorter than 32 bytes")
    } else if trimmed.len() != token.len() {
        Some("has leading or trailing whitespace (a token file's final newline?); remove it")
    } else {
        None
    }
}

/// The configuration-only checks (before any file is touched).
pub fn check_config(config: &Config) -> Result<(), ServerError> {
    match &config.auth_token {
        None => return Err(refuse("auth_token", "not set (QUICNPROTOCHAT_AUTH_TOKEN)")),
        Some(t) => {
            if let Some(problem) = token_problem(&t.0) {
                return Err(refuse("auth_token", problem));
            }
        }
    }
    match &config.db_key {
        DbKeySetting::Provided(k) if k.0.iter().all(|b| *b == k.0[0]) => {
            return Err(refuse(
                "db_key",
                "is one repeated byte (a placeholder, not a random key)",
            ));
        }
        DbKeySetting::Provided(_) => {}
        DbKeySetting::DevGenerated => {
            return Err(refuse("db_key", "not set (QUICNPROTOCHAT_DB_KEY)"));
        }
        DbKeySetting::Disabled => {
            return Err(refuse(
                "db_key",
                "is empty, which would disable encryption at rest",
            ));
        }
    }
    if config.tls_paths.is_none() {
        return Err(refuse(
            "cert_path",
            "certificate and key paths are required (QUICNPROTOCHAT_CERT, QUICNPROTOCHAT_KEY); \
             production never generates a self-signed certificate",
        ));
    }
    Ok(())
}

/// Checks that `dir` accepts new files (creates and removes a probe).
pub fn check_writable(dir: &Path) -> Result<(), ServerError> {
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"probe")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|source| ServerError::File {
            what: "data_dir is not writable",
            path: dir.display().to_string(),
            source,
        })
}

/// Validity of a DER certificate at `now` (Unix seconds): `Err` says why not.
pub fn certificate_validity(der: &[u8], now: i64) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let validity = cert.validity();
    if now > validity.not_after.timestamp() {
        return Err(format!("the certificate expired on {}", validity.not_after));
    }
    if now < validity.not_before.timestamp() {
        return Err(format!(
            "the certificate is not valid before {}",
            validity.not_before
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeyBytes, Secret};

    fn prod() -> Config {
        let mut c = Config::development("/nonexistent");
        c.mode = crate::config::Mode::Production;
        c.auth_token = Some(Secret("a".repeat(40)));
        c.db_key = DbKeySetting::Provided(KeyBytes(std::array::from_fn(|i| i as u8)));
        c.tls_paths = Some(("cert.pem".into(), "key.pem".into()));
        c
    }

    fn refused_setting(c: &Config) -> Option<&'static str> {
        match check_config(c) {
            Err(ServerError::Production { setting, .. }) => Some(setting),
            _ => None,
        }
    }

    #[test]
    fn each_missing_or_weak_secret_is_refused_by_name() {
        assert_eq!(refused_setting(&prod()), None);
        for token in [
            None,
            Some(""),
            Some("devtoken"),
            Some("short"),
            Some(EXAMPLE_TOKENS[1]),
        ] {
            let mut c = prod();
            c.auth_token = token.map(|t| Secret(t.into()));
            assert_eq!(refused_setting(&c), Some("auth_token"), "{token:?}");
        }
        for key in [
            DbKeySetting::DevGenerated,
            DbKeySetting::Disabled,
            DbKeySetting::Provided(KeyBytes([0; 32])),
        ] {
            let mut c = prod();
            c.db_key = key;
            assert_eq!(refused_setting(&c), Some("db_key"));
        }
        let mut c = prod();
        c.tls_paths = None;
        assert_eq!(refused_setting(&c), Some("cert_path"));
    }

    #[test]
    fn whitespace_around_a_token_is_refused_without_showing_it() {
        let strong = "k7Q2mZ9xV4bN1cR8tY5wE3uI6oP0aS2dF7gH4jK9lZ";
        for pad in [
            " ", "\n", "\r\n", "\t", "\u{a0}", "\u{2003}", "\u{3000}", "\u{200b}", "\u{feff}",
        ] {
            for token in [format!("{strong}{pad}"), format!("{pad}{strong}")] {
                let mut c = prod();
                c.auth_token = Some(Secret(token.clone()));
                let err = check_config(&c).unwrap_err();
                let line = err.to_string();
                assert!(
                    matches!(
                        err,
                        ServerError::Production {
                            setting: "auth_token",
                            ..
                        }
                    ) && line.contains("whitespace")
                        && !line.contains(strong),
                    "{token:?}: {line}"
                );
            }
            // Judged after trimming: refused as what it is.
            assert_eq!(
                token_problem(&format!("{DEV_AUTH_TOKEN}{pad}")),
                Some("is the public development token")
            );
            for example in EXAMPLE_TOKENS {
                assert_eq!(
                    token_problem(&format!("{pad}{example}{pad}")),
                    token_problem(example),
                    "{example:?}"
                );
            }
            assert_eq!(
                token_problem(&format!("{pad}{pad}")),
                Some("is empty apart from whitespace")
            );
        }
        // Whitespace inside a token is part of it.
        assert_eq!(
            token_problem("correct horse battery staple 0123456789"),
            None
        );
        assert_eq!(token_problem(strong), None);
    }

    #[test]
    fn certificate_dates_are_checked() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert!(certificate_validity(&der, 1_590_000_000).is_ok()); // May 2020
        assert!(
            certificate_validity(&der, 1_700_000_000)
                .unwrap_err()
                .contains("expired")
        );
        assert!(
            certificate_validity(&der, 1_500_000_000)
                .unwrap_err()
                .contains("not valid before")
        );
        assert!(certificate_validity(b"junk", 0).is_err());
    }
}
