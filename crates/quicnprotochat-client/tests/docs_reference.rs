//! The book's client reference (docs/src/client.md) is kept in step with the
//! binary: every flag, subcommand and `QUICNPROTOCHAT_*` variable that
//! `quicnprotochat --help` and each subcommand's `--help` print, and every
//! variable `main.rs` reads directly, is documented; the page names no flag
//! or variable the client lacks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const CLI: &str = env!("CARGO_BIN_EXE_quicnprotochat");
const PAGE: &str = "docs/src/client.md";
const ENV_PREFIX: &str = "QUICNPROTOCHAT_";

fn repo_root() -> PathBuf {
    // The run-time value: a test binary reused from another checkout must
    // still read this one.
    Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../..")
}

fn help(args: &[&str]) -> String {
    let out = Command::new(CLI)
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} --help failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// `--name` at the start of `s` (after the dashes: lowercase, digits, `-`).
fn long_flag(s: &str) -> Option<String> {
    let rest = s.strip_prefix("--")?;
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .collect();
    name.starts_with(|c: char| c.is_ascii_lowercase())
        .then(|| format!("--{name}"))
}

/// Long flags that start an option line of clap's help.
fn help_flags(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = match line.as_bytes() {
                [b'-', c, b',', b' ', ..] if c.is_ascii_alphabetic() => &line[4..],
                _ => line,
            };
            long_flag(line)
        })
        .collect()
}

/// Every `QUICNPROTOCHAT_NAME` in `text`.
fn env_names(text: &str) -> BTreeSet<String> {
    text.match_indices(ENV_PREFIX)
        .filter_map(|(i, _)| {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let name = name.trim_end_matches('_');
            (name.len() > ENV_PREFIX.len()).then(|| name.to_string())
        })
        .collect()
}

/// Subcommands listed under `Commands:`.
fn help_commands(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Every code span and every line of every code block of a Markdown page.
fn code_of(text: &str) -> Vec<String> {
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
            out.extend(line.split('`').skip(1).step_by(2).map(str::to_string));
        }
    }
    out
}

/// Long flags inside code on the page.
fn page_flags(text: &str) -> BTreeSet<String> {
    code_of(text)
        .iter()
        .flat_map(|code| {
            code.match_indices("--")
                .filter(|(i, _)| *i == 0 || !code.as_bytes()[i - 1].is_ascii_alphanumeric())
                .filter_map(|(i, _)| long_flag(&code[i..]))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn client_reference_matches_help() {
    let top = help(&[]);
    let commands = help_commands(&top);
    assert!(
        commands.iter().any(|c| c == "register") && commands.iter().any(|c| c == "chat"),
        "the help parser found no commands: {commands:?}"
    );
    let mut flags = help_flags(&top);
    let mut env = env_names(&top);
    for command in commands.iter().filter(|c| *c != "help") {
        let text = help(&[command]);
        flags.extend(help_flags(&text));
        env.extend(env_names(&text));
    }
    // Variables main.rs reads itself (the passphrase is never a flag).
    let main =
        std::fs::read_to_string(repo_root().join("crates/quicnprotochat-client/src/main.rs"))
            .unwrap();
    let read_directly: BTreeSet<String> = main
        .match_indices("env::var(\"")
        .flat_map(|(i, _)| {
            env_names(&main[i..(i + 80).min(main.len())])
                .into_iter()
                .take(1)
        })
        .collect();
    assert!(read_directly.contains("QUICNPROTOCHAT_PASSPHRASE"));
    env.extend(read_directly);
    assert!(
        flags.contains("--pin-cert") && flags.contains("--count") && env.len() >= 4,
        "the help parser found too little: {flags:?} {env:?}"
    );

    let page = std::fs::read_to_string(repo_root().join(PAGE)).unwrap();
    let documented = page_flags(&page);
    let missing: Vec<_> = flags.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "{PAGE} does not document these flags of quicnprotochat: {missing:?}"
    );
    let unknown: Vec<_> = documented.difference(&flags).collect();
    assert!(
        unknown.is_empty(),
        "{PAGE} names flags quicnprotochat does not have: {unknown:?}"
    );

    let documented = env_names(&page);
    let missing: Vec<_> = env.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "{PAGE} does not document these environment variables: {missing:?}"
    );
    let unknown: Vec<_> = documented.difference(&env).collect();
    assert!(
        unknown.is_empty(),
        "{PAGE} names environment variables quicnprotochat does not read: {unknown:?}"
    );

    for command in &commands {
        assert!(
            page.contains(&format!("`{command}`")) || page.contains(&format!("`{command} ")),
            "{PAGE} does not document the command {command}"
        );
    }
}
