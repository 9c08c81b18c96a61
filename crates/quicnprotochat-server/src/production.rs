//! The production-mode gate.
//!
//! In production mode the server refuses to start, with one line naming the
//! setting, unless every secret is real: an access token of at least 32 bytes
//! that is not the development token nor any value shown in the
//! documentation (judged after trimming whitespace) and has no whitespace
//! around it; a database key (encryption on) that is not one repeated byte
//! such as all zeros; certificate and key files
//! that load, match each other, are within their validity period and are not
//! the development certificate (by its subject, or by being the development
//! files of the data directory); a writable data directory that only the
//! server's user may enter (no permission for group or others).  In
//! development mode the same shortcuts are allowed and each one in use is
//! logged as a warning at start-up.

use std::net::IpAddr;
use std::path::Path;

use x509_parser::extensions::GeneralName;

use crate::config::{Config, DEV_AUTH_TOKEN, DbKeySetting, KeyBytes};
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
    // Tokens in the token file are judged when it is read (at start and at
    // each reload), by `tokens::accepted_tokens`.
    if config.auth_token.is_none()
        && config.auth_tokens.is_empty()
        && config.auth_token_file.is_none()
    {
        return Err(refuse("auth_token", "not set (QUICNPROTOCHAT_AUTH_TOKEN)"));
    }
    for t in config.auth_token.iter().chain(&config.auth_tokens) {
        if let Some(problem) = token_problem(&t.0) {
            return Err(refuse("auth_token", problem));
        }
    }
    if let Some(url) = &config.database_url {
        if let Some(problem) = database_url_problem(&url.0, config.database_ca.is_some()) {
            return Err(refuse("database_url", problem));
        }
    } else {
        check_db_key(config)?;
    }
    if let Some(addr) = config.metrics_listen
        && !addr.ip().is_loopback()
        && !config.metrics_public
    {
        return Err(refuse(
            "metrics_listen",
            "is not a loopback address: the endpoint has no authentication, and its metrics \
             tell traffic volumes and its probes who is up; put it on loopback or a private \
             network and set metrics_public (QUICNPROTOCHAT_METRICS_PUBLIC=true) to say so",
        ));
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

/// Why production mode refuses the PostgreSQL connection string `url`, if
/// it does: without TLS to the database (`verified_tls`: `database_ca` is
/// set, so every TCP connection is TLS with the certificate verified),
/// every host must be a Unix socket or a loopback address (on the network
/// the password and every queued message's metadata would pass in the
/// clear).  The reason never contains the string.
pub fn database_url_problem(url: &str, verified_tls: bool) -> Option<String> {
    let config = match crate::store::postgres::PgOptions::new(url).parse() {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    if verified_tls {
        return None;
    }
    for host in config.get_hosts() {
        match host {
            tokio_postgres::config::Host::Unix(_) => {}
            // With `hostaddr`, the name is only the TLS name: the
            // addresses are judged below.
            tokio_postgres::config::Host::Tcp(_) if !config.get_hostaddrs().is_empty() => {}
            tokio_postgres::config::Host::Tcp(name) => {
                let loopback = name == "localhost"
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    return Some(format!(
                        "the host {name} is neither a Unix socket nor loopback, and database_ca \
                         is not set: production connects to a database on the network only over \
                         TLS with a verified certificate (operations guide, \"Several nodes on \
                         PostgreSQL\")"
                    ));
                }
            }
        }
    }
    if let Some(ip) = config.get_hostaddrs().iter().find(|ip| !ip.is_loopback()) {
        return Some(format!(
            "the hostaddr {ip} is not loopback, and database_ca is not set: production connects \
             to a database on the network only over TLS with a verified certificate"
        ));
    }
    None
}

/// Why production mode refuses the database key `key`, if it does: one
/// repeated byte, such as all zeros, is a placeholder, not a random key.
pub fn db_key_problem(key: &KeyBytes) -> Option<&'static str> {
    key.0
        .iter()
        .all(|b| *b == key.0[0])
        .then_some("is one repeated byte (a placeholder, not a random key)")
}

fn check_db_key(config: &Config) -> Result<(), ServerError> {
    match &config.db_key {
        DbKeySetting::Provided(k) => {
            if let Some(problem) = db_key_problem(k) {
                return Err(refuse("db_key", problem));
            }
        }
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

/// Refuses a data directory that group or others may read, write or enter
/// (any mode beyond 0700): the server creates it 0700 and its files 0600,
/// but a directory created beforehand (a bind mount, a volume, an image
/// layer) keeps the mode it was given.
pub fn check_private_dir(dir: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir)
        .map_err(|source| ServerError::File {
            what: "data directory",
            path: dir.display().to_string(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    Err(refuse(
        "data_dir",
        format!(
            "{} is mode {mode:04o}: group or others may enter it; \
             make it private to the server's user (chmod 700)",
            dir.display()
        ),
    ))
}

/// Subject common name of the certificate development mode generates: the
/// marker by which production mode recognises it wherever it is copied.
pub const DEV_CERT_COMMON_NAME: &str = "quicnprotochat development certificate";

/// Subject alternative names of the development certificate.
pub const DEV_CERT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The subject rcgen gives a certificate by default; development
/// certificates generated before they carried [`DEV_CERT_COMMON_NAME`] have
/// it, with exactly [`DEV_CERT_NAMES`].
const RCGEN_DEFAULT_COMMON_NAME: &str = "rcgen self signed cert";

/// What to do instead, appended to each refusal of the development
/// certificate.
const REAL_CERTIFICATE_HINT: &str = "give this server a certificate and key of its own: one from your CA, \
     or a self-signed one for the server's name that clients pin \
     (operator guide, TLS certificates and pinning)";

/// Whether `der` is a certificate development mode generated: it carries
/// [`DEV_CERT_COMMON_NAME`], or it is rcgen's default self-signed
/// certificate for exactly [`DEV_CERT_NAMES`] (what development mode wrote
/// before it set the marker).
pub fn is_development_certificate(der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let common_names: Vec<&str> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .collect();
    if common_names.contains(&DEV_CERT_COMMON_NAME) {
        return true;
    }
    if common_names != [RCGEN_DEFAULT_COMMON_NAME] || cert.subject() != cert.issuer() {
        return false;
    }
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    let mut names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(n) => (*n).to_string(),
            GeneralName::IPAddress(ip) => {
                match (<[u8; 4]>::try_from(*ip), <[u8; 16]>::try_from(*ip)) {
                    (Ok(v4), _) => IpAddr::from(v4).to_string(),
                    (_, Ok(v6)) => IpAddr::from(v6).to_string(),
                    _ => String::new(),
                }
            }
            // Any other kind of name: not the development certificate.
            _ => String::new(),
        })
        .collect();
    names.sort();
    let mut dev: Vec<String> = DEV_CERT_NAMES.iter().map(|n| (*n).to_string()).collect();
    dev.sort();
    names == dev
}

/// Whether `a` and `b` name the same existing file (through any link).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Refuses the development certificate and key: `cert` or `key` being the
/// files development mode generates in `data_dir` (`dev_cert_file`,
/// `dev_key_file`), or `leaf` (the DER end-entity certificate) being a
/// development certificate wherever it was copied.
pub fn check_not_development_tls(
    cert: &Path,
    key: &Path,
    data_dir: &Path,
    (dev_cert_file, dev_key_file): (&str, &str),
    leaf: &[u8],
) -> Result<(), ServerError> {
    if is_development_certificate(leaf) {
        return Err(refuse(
            "cert_path",
            format!(
                "is the certificate development mode generates (self-signed for localhost, \
                 its key kept in a data directory); {REAL_CERTIFICATE_HINT}"
            ),
        ));
    }
    if same_file(cert, &data_dir.join(dev_cert_file)) {
        return Err(refuse(
            "cert_path",
            format!(
                "is {dev_cert_file} in the data directory, the development certificate's file \
                 (development mode may replace it); {REAL_CERTIFICATE_HINT}"
            ),
        ));
    }
    if same_file(key, &data_dir.join(dev_key_file)) {
        return Err(refuse(
            "key_path",
            format!(
                "is {dev_key_file} in the data directory, the development certificate's key file \
                 (development mode may replace it); {REAL_CERTIFICATE_HINT}"
            ),
        ));
    }
    Ok(())
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
    fn a_public_metrics_endpoint_needs_metrics_public() {
        let mut c = prod();
        for local in ["127.0.0.1:9464", "[::1]:9464", "127.0.0.2:0"] {
            c.metrics_listen = Some(local.parse().unwrap());
            assert_eq!(refused_setting(&c), None, "{local}");
        }
        for public in ["0.0.0.0:9464", "10.0.0.5:9464", "[::]:9464"] {
            c.metrics_listen = Some(public.parse().unwrap());
            assert_eq!(refused_setting(&c), Some("metrics_listen"), "{public}");
            c.metrics_public = true;
            assert_eq!(refused_setting(&c), None, "{public} with metrics_public");
            c.metrics_public = false;
        }
    }

    #[test]
    fn on_postgresql_only_a_local_database_is_accepted_and_no_db_key_is_needed() {
        for local in [
            "host=/run/postgresql dbname=q",
            "postgresql://user:secret@localhost/q",
            "postgresql://user:secret@127.0.0.1:5432/q",
            "postgresql://user:secret@[::1]/q",
            "host=db.example hostaddr=127.0.0.1 dbname=q",
        ] {
            let mut c = prod();
            c.db_key = DbKeySetting::DevGenerated;
            c.database_url = Some(Secret(local.into()));
            assert_eq!(refused_setting(&c), None, "{local}");
        }
        for remote in [
            "postgresql://user:secret@db.example/q",
            "postgresql://user:secret@10.0.0.5/q",
            "host=/run/postgresql,db.example dbname=q",
            "host=localhost hostaddr=192.0.2.1 dbname=q",
            "dbname=q",
        ] {
            let mut c = prod();
            c.database_url = Some(Secret(remote.into()));
            assert_eq!(refused_setting(&c), Some("database_url"), "{remote}");
            // With verified TLS any host will do (a string with no host
            // still will not).
            c.database_ca = Some("ca.pem".into());
            let expected = (remote == "dbname=q").then_some("database_url");
            assert_eq!(refused_setting(&c), expected, "{remote} with database_ca");
            c.database_ca = None;
            // The reason never shows the string (it may hold a password).
            match check_config(&c) {
                Err(e) => assert!(!e.to_string().contains("secret"), "{e}"),
                Ok(()) => panic!("{remote} accepted"),
            }
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

    fn self_signed(names: &[&str], common_name: Option<&str>) -> Vec<u8> {
        let names = names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if let Some(cn) = common_name {
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_development_certificate_is_recognised_wherever_it_is() {
        use crate::server::{DEV_CERT_FILE, DEV_KEY_FILE, load_or_create_dev_cert};
        let files = (DEV_CERT_FILE, DEV_KEY_FILE);
        let data = tempfile::tempdir().unwrap();
        let (chain, _) = load_or_create_dev_cert(data.path()).unwrap();
        let leaf = chain[0].as_ref();
        assert!(is_development_certificate(leaf));

        let refused =
            |cert: &Path, key: &Path, dir: &Path, leaf: &[u8]| match check_not_development_tls(
                cert, key, dir, files, leaf,
            ) {
                Err(e @ ServerError::Production { setting, .. }) => {
                    let line = e.to_string();
                    assert!(line.contains("your CA") && line.contains("pin"), "{line}");
                    Some(setting)
                }
                Err(e) => panic!("{e}"),
                Ok(()) => None,
            };
        // In place, and copied to another directory next to another data
        // directory: the certificate itself is recognised.
        let (cert, key) = (
            data.path().join(DEV_CERT_FILE),
            data.path().join(DEV_KEY_FILE),
        );
        assert_eq!(refused(&cert, &key, data.path(), leaf), Some("cert_path"));
        let other = tempfile::tempdir().unwrap();
        let (copy_cert, copy_key) = (other.path().join("c.pem"), other.path().join("k.pem"));
        std::fs::copy(&cert, &copy_cert).unwrap();
        std::fs::copy(&key, &copy_key).unwrap();
        assert_eq!(
            refused(&copy_cert, &copy_key, &other.path().join("data"), leaf),
            Some("cert_path")
        );

        // What development mode wrote before the marker: rcgen's default
        // subject, exactly the development names.
        assert!(is_development_certificate(&self_signed(
            &DEV_CERT_NAMES,
            None
        )));
        // Not the development certificate: other names under rcgen's default
        // subject, the same names under the operator's own subject, junk.
        let own = self_signed(&DEV_CERT_NAMES, Some("chat.internal"));
        for der in [
            self_signed(&["localhost"], None),
            self_signed(&["localhost", "127.0.0.1"], None),
            self_signed(&["localhost", "127.0.0.1", "::1", "chat.example.org"], None),
            own.clone(),
        ] {
            assert!(!is_development_certificate(&der));
        }
        assert!(!is_development_certificate(b"junk"));
        assert_eq!(refused(&copy_cert, &copy_key, other.path(), &own), None);

        // The development file names of the data directory, under any path.
        let link = other.path().join("link.pem");
        std::os::unix::fs::symlink(&cert, &link).unwrap();
        assert_eq!(
            refused(&link, &copy_key, data.path(), &own),
            Some("cert_path")
        );
        assert_eq!(
            refused(&copy_cert, &key, data.path(), &own),
            Some("key_path")
        );
        let dotted = data.path().join(".").join(DEV_KEY_FILE);
        assert_eq!(
            refused(&copy_cert, &dotted, data.path(), &own),
            Some("key_path")
        );
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
