//! The book's server configuration reference (docs/src/configuration.md) is
//! kept in step with the binary and with `config.rs`: every flag and
//! `QUICNPROTOCHAT_*` variable `--help` prints is documented, the page names
//! no flag or variable the binary lacks, every configuration-file key is
//! named, and the page's complete example parses, is accepted and carries
//! exactly the built-in defaults.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use quicnprotochat_server::config::{
    Config, DEFAULT_DRAIN_TIMEOUT, FileConfig, Limits, ServerArgs,
};

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");
const PAGE: &str = "docs/src/configuration.md";

fn repo_root() -> PathBuf {
    // The run-time value: a test binary reused from another checkout must
    // still read this one.
    Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../..")
}

fn page() -> String {
    std::fs::read_to_string(repo_root().join(PAGE)).unwrap()
}

/// The output of `quicnprotochat-server ARGS --help`.
fn help(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} --help failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Long flags that start an option line of clap's help (`  -h, --help`,
/// `      --listen <LISTEN>`).
fn help_flags(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"(?m)^\s+(?:-[A-Za-z], )?(--[a-z][a-z0-9-]*)").unwrap();
    re.captures_iter(text).map(|c| c[1].to_string()).collect()
}

/// `QUICNPROTOCHAT_*` variables in `[env: NAME=…]` annotations.
fn help_env(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\[env: (QUICNPROTOCHAT_[A-Z0-9_]+)").unwrap();
    re.captures_iter(text).map(|c| c[1].to_string()).collect()
}

/// Subcommands listed under `Commands:`.
fn help_commands(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut in_commands = false;
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            match line.split_whitespace().next() {
                Some(word) if line.starts_with("  ") => {
                    out.insert(word.to_string());
                }
                _ => break,
            }
        }
    }
    out
}

/// Long flags written inside code spans or code blocks of a Markdown page.
fn page_flags(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"(?:^|[\s`(\[])(--[a-z][a-z0-9-]*)").unwrap();
    code_of(text)
        .iter()
        .flat_map(|code| re.captures_iter(code).map(|c| c[1].to_string()))
        .collect()
}

/// Every code span and every line of every code block of a Markdown page.
fn code_of(text: &str) -> Vec<String> {
    let span = regex::Regex::new(r"`([^`]+)`").unwrap();
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            out.push(line.to_string());
        } else {
            out.extend(span.captures_iter(line).map(|c| c[1].to_string()));
        }
    }
    out
}

fn page_env(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"QUICNPROTOCHAT_[A-Z0-9_]*[A-Z0-9]").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_string()).collect()
}

#[test]
fn configuration_page_matches_help() {
    let top = help(&[]);
    let serve = help(&["serve"]);
    let health = help(&["health"]);
    let backup = help(&["backup"]);
    let restore = help(&["restore"]);
    let rekey = help(&["rekey"]);
    let admin = help(&["admin"]);
    let admin_commands: Vec<String> = help_commands(&admin)
        .into_iter()
        .filter(|c| c != "help")
        .map(|c| help(&["admin", &c]))
        .collect();
    assert!(admin_commands.len() >= 4, "admin has its commands: {admin}");
    let mut flags = BTreeSet::new();
    let mut env = BTreeSet::new();
    for text in [&top, &serve, &health, &backup, &restore, &rekey, &admin]
        .into_iter()
        .chain(&admin_commands)
    {
        flags.extend(help_flags(text));
        env.extend(help_env(text));
    }
    assert!(
        flags.contains("--listen") && flags.contains("--addr") && env.len() >= 8,
        "the help parser found too little: {flags:?} {env:?}"
    );
    let page = page();

    let documented = page_flags(&page);
    let missing: Vec<_> = flags.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "{PAGE} does not document these flags of quicnprotochat-server: {missing:?}"
    );
    let unknown: Vec<_> = documented.difference(&flags).collect();
    assert!(
        unknown.is_empty(),
        "{PAGE} names flags quicnprotochat-server does not have: {unknown:?}"
    );

    let documented = page_env(&page);
    let missing: Vec<_> = env.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "{PAGE} does not document these environment variables: {missing:?}"
    );
    let unknown: Vec<_> = documented.difference(&env).collect();
    assert!(
        unknown.is_empty(),
        "{PAGE} names environment variables quicnprotochat-server does not read: {unknown:?}"
    );

    for command in help_commands(&top) {
        assert!(
            page.contains(&format!("`{command}`")),
            "{PAGE} does not document the subcommand {command}"
        );
    }
    for command in help_commands(&admin) {
        assert!(
            page.contains(&format!("`admin {command}")) || command == "help",
            "{PAGE} does not document the admin command {command}"
        );
    }
}

/// Field names of `pub struct NAME { … }` in `config.rs`.
fn struct_fields(source: &str, name: &str) -> Vec<String> {
    let start = source
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("no struct {name} in config.rs"));
    let body = &source[start..];
    let body = &body[..body.find("\n}").unwrap()];
    let re = regex::Regex::new(r"(?m)^\s+pub ([a-z_0-9]+):").unwrap();
    re.captures_iter(body).map(|c| c[1].to_string()).collect()
}

/// The first ```toml block after the marker comment.
fn complete_example(page: &str) -> String {
    let marker = page
        .find("parses the next toml block")
        .expect("the complete-example marker comment");
    let rest = &page[marker..];
    let start = rest
        .find("```toml\n")
        .expect("a toml block after the marker")
        + 8;
    let end = rest[start..].find("```").unwrap();
    rest[start..start + end].to_string()
}

fn keys(table: &toml::Table) -> BTreeSet<String> {
    table.keys().cloned().collect()
}

#[test]
fn configuration_page_lists_every_file_key_and_default() {
    let source =
        std::fs::read_to_string(repo_root().join("crates/quicnprotochat-server/src/config.rs"))
            .unwrap();
    let page = page();

    let file_keys = struct_fields(&source, "FileConfig");
    let limit_keys = struct_fields(&source, "Limits");
    let rate_keys = struct_fields(&source, "RateLimits");
    let rate_fields = struct_fields(&source, "Rate");
    assert!(file_keys.len() >= 9 && limit_keys.len() >= 12 && rate_keys.len() >= 5);
    for key in file_keys
        .iter()
        .chain(&limit_keys)
        .chain(&rate_keys)
        .chain(&rate_fields)
    {
        assert!(
            page.contains(&format!("`{key}`")),
            "{PAGE} does not document the configuration key {key}"
        );
    }

    // Every toml block on the page is a valid configuration file.
    let mut block: Option<String> = None;
    let mut blocks = 0;
    for line in page.lines() {
        let fence = line.trim();
        match block.take() {
            None if fence == "```toml" => block = Some(String::new()),
            None => {}
            Some(b) if fence == "```" => {
                toml::from_str::<FileConfig>(&b)
                    .unwrap_or_else(|e| panic!("a toml block of {PAGE} is invalid: {e}\n{b}"));
                blocks += 1;
            }
            Some(mut b) => {
                b.push_str(line);
                b.push('\n');
                block = Some(b);
            }
        }
    }
    assert!(blocks >= 1, "{PAGE} has no toml block");

    // The complete example names every key of [limits] and [limits.rates]
    // and carries exactly the built-in defaults.
    let example = complete_example(&page);
    let table: toml::Table = toml::from_str(&example).unwrap();
    let limits = table["limits"].as_table().unwrap();
    let rates = limits["rates"].as_table().unwrap();
    assert_eq!(
        keys(limits),
        limit_keys.iter().cloned().collect::<BTreeSet<_>>(),
        "the complete example's [limits] keys"
    );
    assert_eq!(
        keys(rates),
        rate_keys.iter().cloned().collect::<BTreeSet<_>>(),
        "the complete example's [limits.rates] keys"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(&file, &example).unwrap();
    let config = Config::resolve(&ServerArgs {
        config: Some(file),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("the complete example is refused: {e}"));
    assert_eq!(
        config.limits,
        Limits::default(),
        "the complete example's limits differ from the built-in defaults"
    );
    assert_eq!(
        config.drain_timeout, DEFAULT_DRAIN_TIMEOUT,
        "the complete example's drain_timeout_secs differs from the built-in default"
    );
}
