//! The production-mode gate, through the real binary: every refusal names
//! its setting in one line and exits non-zero; development mode logs a
//! warning for every shortcut it takes; no documented token passes.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use quicnprotochat_server::production::{EXAMPLE_TOKENS, token_problem};

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");
const STRONG: &str = "prod-token-6c1f0e2d9b8a7f6e5d4c3b2a1f0e9d8c";
const DB_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write_cert(&self, name: &str, not_after_year: i32, key: &rcgen::KeyPair) -> PathBuf {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
        let cert = params.self_signed(key).unwrap();
        let path = self.dir.path().join(name);
        std::fs::write(&path, cert.pem()).unwrap();
        path
    }

    fn write_key(&self, name: &str, key: &rcgen::KeyPair) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, key.serialize_pem()).unwrap();
        path
    }
}

fn command(data: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("QUICNPROTOCHAT_DATA_DIR", data)
        .env("QUICNPROTOCHAT_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the server; returns (started, stderr up to "listening" or exit).
fn run(data: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let mut child = command(data, env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut started = false;
    for line in BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        started = line.contains("listening");
        lines.push(line);
        if started {
            break;
        }
    }
    if started {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert!(started || !status.success(), "a refusal must exit non-zero");
    (started, lines.join("\n"))
}

/// Runs the server, which must refuse to start; returns its one error line,
/// after checking that no secret of these tests appears anywhere in its output.
fn refusal(data: &Path, env: &[(&str, &str)]) -> String {
    let (started, stderr) = run(data, env);
    assert!(!started, "production mode must refuse: {stderr}");
    assert!(
        !stderr.contains(STRONG) && !stderr.contains(DB_KEY),
        "a secret leaked: {stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one clear line: {stderr}");
    errors[0].to_string()
}

#[test]
fn production_refuses_each_weak_setting_by_name_and_starts_when_all_are_real() {
    let pki = Pki::new();
    let key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    let good_cert = pki.write_cert("good.pem", 2099, &key);
    let expired_cert = pki.write_cert("expired.pem", 2021, &key);
    let good_key = pki.write_key("key.pem", &key);
    let wrong_key = pki.write_key("other.pem", &other);
    let (good_cert, expired_cert, good_key, wrong_key) = (
        good_cert.to_str().unwrap().to_string(),
        expired_cert.to_str().unwrap().to_string(),
        good_key.to_str().unwrap().to_string(),
        wrong_key.to_str().unwrap().to_string(),
    );
    let dir_as_cert = pki.dir.path().to_str().unwrap().to_string();
    let example = EXAMPLE_TOKENS[EXAMPLE_TOKENS.len() - 1];
    let base = [
        ("QUICNPROTOCHAT_MODE", "production"),
        ("QUICNPROTOCHAT_AUTH_TOKEN", STRONG),
        ("QUICNPROTOCHAT_DB_KEY", DB_KEY),
        ("QUICNPROTOCHAT_CERT", good_cert.as_str()),
        ("QUICNPROTOCHAT_KEY", good_key.as_str()),
    ];
    let with = |k: &str, v: Option<&str>| -> Vec<(String, String)> {
        base.iter()
            .filter(|(bk, _)| *bk != k)
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .chain(v.map(|v| (k.to_string(), v.to_string())))
            .collect()
    };
    type Env = Vec<(String, String)>;
    let cases: Vec<(Env, &str, &str)> = vec![
        (
            with("QUICNPROTOCHAT_AUTH_TOKEN", None),
            "auth_token",
            "not set",
        ),
        (
            with("QUICNPROTOCHAT_AUTH_TOKEN", Some("")),
            "auth_token",
            "empty",
        ),
        (
            with("QUICNPROTOCHAT_AUTH_TOKEN", Some("devtoken")),
            "auth_token",
            "development token",
        ),
        (
            with("QUICNPROTOCHAT_AUTH_TOKEN", Some("short-token")),
            "auth_token",
            "shorter than 32",
        ),
        (
            with("QUICNPROTOCHAT_AUTH_TOKEN", Some(example)),
            "auth_token",
            "example value",
        ),
        (with("QUICNPROTOCHAT_DB_KEY", None), "db_key", "not set"),
        (
            with("QUICNPROTOCHAT_DB_KEY", Some("")),
            "db_key",
            "disable encryption",
        ),
        (
            with("QUICNPROTOCHAT_CERT", None)
                .into_iter()
                .filter(|(k, _)| k != "QUICNPROTOCHAT_KEY")
                .collect(),
            "cert_path",
            "required",
        ),
        (
            with("QUICNPROTOCHAT_CERT", None),
            "cert_path",
            "key_path is set",
        ),
        (
            with("QUICNPROTOCHAT_CERT", Some(&dir_as_cert)),
            "cert_path",
            "cannot read",
        ),
        (
            with("QUICNPROTOCHAT_CERT", Some(&expired_cert)),
            "cert_path",
            "expired",
        ),
        (
            with("QUICNPROTOCHAT_KEY", Some(&wrong_key)),
            "key_path",
            "does not match",
        ),
    ];
    for (env, setting, why) in &cases {
        let data = tempfile::tempdir().unwrap();
        let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let (started, stderr) = run(&data.path().join("data"), &env);
        assert!(!started, "production mode must refuse ({setting}: {why})");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one clear line for {setting}: {stderr}");
        assert!(
            errors[0].contains(setting) && errors[0].contains(why),
            "{setting}/{why}: {stderr}"
        );
        assert!(
            !stderr.contains(STRONG) && !stderr.contains(DB_KEY),
            "a secret leaked: {stderr}"
        );
    }
    // Data directory that cannot be written (a path below a regular file).
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let (started, stderr) = run(&file.join("data"), &base);
    assert!(!started);
    assert!(
        stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .all(|l| l.contains("data dir")),
        "{stderr}"
    );
    // Control: with every setting real, production mode starts (and warns about nothing).
    let data = tempfile::tempdir().unwrap();
    let (started, stderr) = run(&data.path().join("data"), &base);
    assert!(
        started,
        "production mode must start with real settings: {stderr}"
    );
    assert!(!stderr.contains("DEVELOPMENT SHORTCUT"), "{stderr}");
}

#[test]
fn development_mode_warns_about_every_shortcut_it_takes() {
    let data = tempfile::tempdir().unwrap();
    let (started, stderr) = run(&data.path().join("data"), &[]);
    assert!(started, "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("DEVELOPMENT SHORTCUT"))
        .collect();
    assert_eq!(warnings.len(), 3, "{stderr}");
    assert!(warnings.iter().any(|w| w.contains("development token")));
    assert!(warnings.iter().any(|w| w.contains("database key")));
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("self-signed certificate") && w.contains("fingerprint="))
    );

    let data = tempfile::tempdir().unwrap();
    let (started, stderr) = run(
        &data.path().join("data"),
        &[
            ("QUICNPROTOCHAT_DB_KEY", ""),
            ("QUICNPROTOCHAT_AUTH_TOKEN", STRONG),
        ],
    );
    assert!(started, "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("DEVELOPMENT SHORTCUT"))
        .collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(warnings.iter().any(|w| w.contains("NOT encrypted")));
    assert!(!stderr.contains(STRONG));

    let pki = Pki::new();
    let key = rcgen::KeyPair::generate().unwrap();
    let expired = pki.write_cert("expired.pem", 2021, &key);
    let key_path = pki.write_key("key.pem", &key);
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("QUICNPROTOCHAT_AUTH_TOKEN", STRONG),
        ("QUICNPROTOCHAT_DB_KEY", DB_KEY),
        ("QUICNPROTOCHAT_CERT", expired.to_str().unwrap()),
        ("QUICNPROTOCHAT_KEY", key_path.to_str().unwrap()),
    ];
    let (started, stderr) = run(&data.path().join("data"), &env);
    assert!(started, "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("DEVELOPMENT SHORTCUT"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("expired"));
}

/// The repository root, read at run time: a test binary reused from another
/// checkout must still read this one.
fn repo_root() -> PathBuf {
    Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../..")
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.filter_map(Result::ok).map(|e| e.path()) {
        if path.is_dir() {
            collect_files(&path, out);
        } else if path
            .extension()
            .is_some_and(|x| x == "md" || x == "toml" || x == "yaml" || x == "yml")
        {
            out.push(path);
        }
    }
}

/// Every token value the README, the book, the Compose file, the Dockerfile
/// and the scripts show, with the file that shows it.
fn documented_tokens() -> Vec<(PathBuf, String)> {
    let root = repo_root();
    let mut files = vec![
        root.join("README.md"),
        root.join("compose.yaml"),
        root.join("Dockerfile"),
    ];
    collect_files(&root.join("docs"), &mut files);
    if let Ok(entries) = std::fs::read_dir(root.join("scripts")) {
        files.extend(entries.filter_map(Result::ok).map(|e| e.path()));
    }
    let patterns = [
        r#"auth_token\s*[=:]\s*"([^"]*)""#,
        r#"AUTH_TOKEN\s*[=:]\s*["']?([^\s"'`]+)"#,
        r#"QUICNPROTOCHAT_TOKEN\s*[=:]\s*["']?([^\s"'`]+)"#,
        r#"--(?:auth-)?token[ =]["']?([^\s"'`]+)"#,
        r"token `([^`\s]+)`",
    ]
    .map(|p| regex::Regex::new(p).unwrap());
    let mut out = Vec::new();
    for f in files.iter().filter(|f| f.is_file()) {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for re in &patterns {
            for cap in re.captures_iter(&text) {
                let value = &cap[1];
                if value.starts_with('$') || value == "…" || value.is_empty() {
                    continue; // a shell variable or an elision, not a value
                }
                out.push((f.clone(), value.to_string()));
            }
        }
    }
    out
}

/// Every token value the documentation shows is refused by production mode.
#[test]
fn documented_tokens_are_refused() {
    let documented = documented_tokens();
    for (file, value) in &documented {
        assert!(
            token_problem(value).is_some(),
            "{} shows the token {value:?}, which production mode would accept: add it to EXAMPLE_TOKENS",
            file.display()
        );
    }
    for example in EXAMPLE_TOKENS {
        assert!(
            documented.iter().any(|(_, v)| v == example),
            "EXAMPLE_TOKENS holds {example:?}, which the scan no longer finds in the documents"
        );
    }
    assert!(
        documented.len() >= 4,
        "the scan found the documented tokens ({documented:?})"
    );
}

/// Whitespace the gate trims before it judges a token: ASCII, Unicode, and
/// the invisible byte-order mark a text editor may leave at a file's start.
const PADDING: &[&str] = &[
    " ", "  ", "\n", "\r\n", "\t", "\u{a0}", "\u{2003}", "\u{3000}", "\u{feff}",
];

/// A documented token with whitespace around it (a copied line, a token
/// file's final newline) is refused for what it is, in process and by the
/// real binary, and the error line never shows it.
#[test]
fn documented_tokens_with_whitespace_are_refused_as_what_they_are() {
    let mut values: Vec<String> = documented_tokens().into_iter().map(|(_, v)| v).collect();
    values.sort();
    values.dedup();
    for value in &values {
        let expected = token_problem(value);
        for pad in PADDING {
            for padded in [
                format!("{value}{pad}"),
                format!("{pad}{value}"),
                format!("{pad}{value}{pad}"),
            ] {
                assert_eq!(
                    token_problem(&padded),
                    expected,
                    "{padded:?} is judged differently from {value:?}"
                );
            }
        }
    }
    let pki = Pki::new();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = pki.write_cert("cert.pem", 2099, &key);
    let key = pki.write_key("key.pem", &key);
    for value in &values {
        let Some(expected) = token_problem(value) else {
            continue; // documented_tokens_are_refused reports it
        };
        let padded = format!("{value} ");
        let env = [
            ("QUICNPROTOCHAT_MODE", "production"),
            ("QUICNPROTOCHAT_AUTH_TOKEN", padded.as_str()),
            ("QUICNPROTOCHAT_DB_KEY", DB_KEY),
            ("QUICNPROTOCHAT_CERT", cert.to_str().unwrap()),
            ("QUICNPROTOCHAT_KEY", key.to_str().unwrap()),
        ];
        let data = tempfile::tempdir().unwrap();
        let line = refusal(&data.path().join("data"), &env);
        assert!(
            line.contains("auth_token") && line.contains(expected),
            "{value:?} plus a space must be refused as {expected:?}: {line}"
        );
    }
}

/// An access token with whitespace around it is refused in production mode,
/// from the environment and from the configuration file, and the error names
/// the setting without showing the token.
#[test]
fn production_refuses_a_token_with_surrounding_whitespace() {
    let pki = Pki::new();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = pki.write_cert("cert.pem", 2099, &key);
    let key = pki.write_key("key.pem", &key);
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    for pad in PADDING {
        for token in [format!("{STRONG}{pad}"), format!("{pad}{STRONG}")] {
            let env = [
                ("QUICNPROTOCHAT_MODE", "production"),
                ("QUICNPROTOCHAT_AUTH_TOKEN", token.as_str()),
                ("QUICNPROTOCHAT_DB_KEY", DB_KEY),
                ("QUICNPROTOCHAT_CERT", cert),
                ("QUICNPROTOCHAT_KEY", key),
            ];
            let data = tempfile::tempdir().unwrap();
            let line = refusal(&data.path().join("data"), &env);
            assert!(
                line.contains("auth_token") && line.contains("whitespace"),
                "{token:?}: {line}"
            );
        }
    }
    // A token file's final newline, carried into the TOML file.
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("server.toml");
    std::fs::write(
        &file,
        format!("auth_token = \"{STRONG}\\n\"\ndb_key = \"{DB_KEY}\"\n"),
    )
    .unwrap();
    let env = [
        ("QUICNPROTOCHAT_MODE", "production"),
        ("QUICNPROTOCHAT_CONFIG", file.to_str().unwrap()),
        ("QUICNPROTOCHAT_CERT", cert),
        ("QUICNPROTOCHAT_KEY", key),
    ];
    let line = refusal(&data.path().join("data"), &env);
    assert!(
        line.contains("auth_token") && line.contains("whitespace"),
        "{line}"
    );
    // Control: the same token without the newline starts.
    std::fs::write(
        &file,
        format!("auth_token = \"{STRONG}\"\ndb_key = \"{DB_KEY}\"\n"),
    )
    .unwrap();
    let (started, stderr) = run(&data.path().join("data"), &env);
    assert!(started, "{stderr}");
}

/// Production refuses a database key of one repeated byte (all zeros, all
/// `ff`), and the pages say so: the security page and the production-mode
/// table state it, and no page claims production accepts such a key.
#[test]
fn repeated_byte_database_keys_are_refused_as_the_pages_say() {
    let pki = Pki::new();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = pki.write_cert("cert.pem", 2099, &key);
    let key = pki.write_key("key.pem", &key);
    for byte in ["00", "ff", "5a"] {
        let db_key = byte.repeat(32);
        let env = [
            ("QUICNPROTOCHAT_MODE", "production"),
            ("QUICNPROTOCHAT_AUTH_TOKEN", STRONG),
            ("QUICNPROTOCHAT_DB_KEY", db_key.as_str()),
            ("QUICNPROTOCHAT_CERT", cert.to_str().unwrap()),
            ("QUICNPROTOCHAT_KEY", key.to_str().unwrap()),
        ];
        let data = tempfile::tempdir().unwrap();
        let line = refusal(&data.path().join("data"), &env);
        assert!(
            line.contains("db_key") && line.contains("repeated byte") && !line.contains(&db_key),
            "{line}"
        );
    }

    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    collect_files(&root.join("docs"), &mut files);
    let weak = regex::Regex::new(r"(?i)all[ -]zero|repeated byte").unwrap();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            if weak.is_match(line) && line.contains("key") {
                assert!(
                    !line.contains("accept") || line.contains("refuse"),
                    "{}:{}: says production accepts an all-zero or repeated-byte key, which it refuses: {line}",
                    f.display(),
                    n + 1
                );
            }
        }
    }
    let security = std::fs::read_to_string(root.join("docs/src/security.md")).unwrap();
    assert!(
        security
            .lines()
            .any(|l| weak.is_match(l) && l.contains("refuse")),
        "security.md states that production refuses an all-zero database key"
    );
    let operations = std::fs::read_to_string(root.join("docs/src/operations.md")).unwrap();
    assert!(
        operations
            .lines()
            .any(|l| l.starts_with('|') && l.contains("repeated byte") && l.contains("`db_key`")),
        "the production-mode table of operations.md lists the repeated-byte database key"
    );
}

/// The certificate development mode generates is refused in production, in
/// place in the data directory and copied elsewhere, with an error that says
/// how to get a real one; a certificate placed under the development file
/// names is refused too.  A self-signed certificate of the operator's own
/// for the same loopback names starts.
#[test]
fn production_refuses_the_development_certificate() {
    let dev_data = tempfile::tempdir().unwrap();
    let dev_dir = dev_data.path().join("data");
    let (started, stderr) = run(&dev_dir, &[]);
    assert!(started, "development server: {stderr}");
    let dev_cert = dev_dir.join("dev-cert.pem");
    let dev_key = dev_dir.join("dev-key.pem");
    let dev_db_key = std::fs::read_to_string(dev_dir.join("dev-db.key")).unwrap();
    let dev_db_key = dev_db_key.trim();
    assert!(dev_cert.is_file() && dev_key.is_file());

    let check = |data: &Path, cert: &Path, key: &Path, db_key: &str, setting: &str| {
        let env = [
            ("QUICNPROTOCHAT_MODE", "production"),
            ("QUICNPROTOCHAT_AUTH_TOKEN", STRONG),
            ("QUICNPROTOCHAT_DB_KEY", db_key),
            ("QUICNPROTOCHAT_CERT", cert.to_str().unwrap()),
            ("QUICNPROTOCHAT_KEY", key.to_str().unwrap()),
        ];
        let (started, stderr) = run(data, &env);
        assert!(
            !started,
            "production mode must refuse the development certificate ({}): {stderr}",
            cert.display()
        );
        assert!(
            !stderr.contains(db_key) && !stderr.contains(STRONG),
            "{stderr}"
        );
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one clear line: {stderr}");
        assert!(
            errors[0].contains(setting)
                && errors[0].contains("development")
                && errors[0].contains("your CA")
                && errors[0].contains("pin"),
            "{stderr}"
        );
    };
    // In place: the development data directory switched to production, with
    // the generated database key given as the real one.
    check(&dev_dir, &dev_cert, &dev_key, dev_db_key, "cert_path");
    // Copied out of the data directory, next to a fresh one.
    let elsewhere = tempfile::tempdir().unwrap();
    let (cert_copy, key_copy) = (
        elsewhere.path().join("tls_cert.pem"),
        elsewhere.path().join("tls_key.pem"),
    );
    std::fs::copy(&dev_cert, &cert_copy).unwrap();
    std::fs::copy(&dev_key, &key_copy).unwrap();
    check(
        &elsewhere.path().join("data"),
        &cert_copy,
        &key_copy,
        DB_KEY,
        "cert_path",
    );
    // Development mode serves it, with a warning.
    let env = [
        ("QUICNPROTOCHAT_AUTH_TOKEN", STRONG),
        ("QUICNPROTOCHAT_DB_KEY", DB_KEY),
        ("QUICNPROTOCHAT_CERT", cert_copy.to_str().unwrap()),
        ("QUICNPROTOCHAT_KEY", key_copy.to_str().unwrap()),
    ];
    let (started, stderr) = run(&elsewhere.path().join("dev"), &env);
    assert!(started, "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("DEVELOPMENT SHORTCUT"))
        .collect();
    assert!(
        warnings.len() == 1 && warnings[0].contains("development certificate"),
        "{stderr}"
    );

    // An operator's own certificate for the same loopback names starts...
    let pki = Pki::new();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()])
            .unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "chat.internal");
    let own_cert = pki.dir.path().join("own-cert.pem");
    std::fs::write(&own_cert, params.self_signed(&key).unwrap().pem()).unwrap();
    let own_key = pki.write_key("own-key.pem", &key);
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("QUICNPROTOCHAT_MODE", "production"),
        ("QUICNPROTOCHAT_AUTH_TOKEN", STRONG),
        ("QUICNPROTOCHAT_DB_KEY", DB_KEY),
        ("QUICNPROTOCHAT_CERT", own_cert.to_str().unwrap()),
        ("QUICNPROTOCHAT_KEY", own_key.to_str().unwrap()),
    ];
    let (started, stderr) = run(&data.path().join("data"), &env);
    assert!(started, "an operator's own certificate: {stderr}");
    // ...but not from the development file names in the data directory,
    // which development mode may regenerate.
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    // Private, as production requires of a data directory.
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&data_dir)
        .unwrap();
    let (in_cert, in_key) = (data_dir.join("dev-cert.pem"), data_dir.join("dev-key.pem"));
    std::fs::copy(&own_cert, &in_cert).unwrap();
    std::fs::copy(&own_key, &in_key).unwrap();
    check(&data_dir, &in_cert, &in_key, DB_KEY, "cert_path");
    check(&data_dir, &own_cert, &in_key, DB_KEY, "key_path");
}

/// A data directory that group or others may enter is refused in
/// production (the one error line names `data_dir`, its mode and the fix)
/// and only warned about in development; made private, it is accepted.
#[test]
fn production_refuses_a_data_directory_others_can_enter() {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = Pki::new();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = pki.write_cert("cert.pem", 2099, &key);
    let key_path = pki.write_key("key.pem", &key);
    let (cert, key_path) = (cert.to_str().unwrap(), key_path.to_str().unwrap());
    let production = [
        ("QUICNPROTOCHAT_MODE", "production"),
        ("QUICNPROTOCHAT_AUTH_TOKEN", STRONG),
        ("QUICNPROTOCHAT_DB_KEY", DB_KEY),
        ("QUICNPROTOCHAT_CERT", cert),
        ("QUICNPROTOCHAT_KEY", key_path),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for open in [0o755, 0o750, 0o701] {
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(open)).unwrap();
        let line = refusal(&data, &production);
        assert!(
            line.contains("data_dir")
                && line.contains(&format!("mode {open:04o}"))
                && line.contains("chmod 700"),
            "{line}"
        );
    }

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (started, stderr) = run(&data, &[("QUICNPROTOCHAT_DB_KEY", DB_KEY)]);
    assert!(started, "development mode only warns: {stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("DEVELOPMENT SHORTCUT") && l.contains("not private")),
        "{stderr}"
    );

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (started, stderr) = run(&data, &production);
    assert!(started, "a private data directory is accepted: {stderr}");
}

#[test]
fn production_judges_every_token_of_the_token_file() {
    let pki = Pki::new();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = pki.write_cert("good.pem", 2099, &key);
    let key_path = pki.write_key("key.pem", &key);
    let tokens = pki.dir.path().join("tokens");
    let tokens_arg = tokens.to_str().unwrap();
    let env = [
        ("QUICNPROTOCHAT_MODE", "production"),
        ("QUICNPROTOCHAT_AUTH_TOKEN_FILE", tokens_arg),
        ("QUICNPROTOCHAT_DB_KEY", DB_KEY),
        ("QUICNPROTOCHAT_CERT", cert.to_str().unwrap()),
        ("QUICNPROTOCHAT_KEY", key_path.to_str().unwrap()),
    ];
    let data = tempfile::tempdir().unwrap();
    let data = data.path().join("data");
    std::fs::write(&tokens, format!("{STRONG}\nshort-token\n")).unwrap();
    let line = refusal(&data, &env);
    assert!(
        line.contains("auth_token") && line.contains("token 2 of 2") && line.contains("shorter"),
        "{line}"
    );
    assert!(!line.contains("short-token"), "{line}");
    std::fs::write(&tokens, format!("{STRONG}\n")).unwrap();
    let (started, stderr) = run(&data, &env);
    assert!(started, "{stderr}");
}
