//! Renders the criterion benchmarks (`mls` in quicnprotochat-core, `store` in
//! quicnprotochat-server) into the benchmarks page, between the markers
//! `<!-- criterion:begin -->` and `<!-- criterion:end -->`: every figure is
//! criterion's median, beside its peer from the same run.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use serde_json::Value;

pub const BEGIN: &str = "<!-- criterion:begin -->";
pub const END: &str = "<!-- criterion:end -->";

/// Target of the MLS operations: ours at most this × raw openmls on SQLite
/// (the like-for-like peer, with the same durability).
const MLS_TARGET: f64 = 1.25;

/// Medians in nanoseconds by criterion's full benchmark id.
type Medians = BTreeMap<String, f64>;

fn collect(dir: &Path, out: &mut Medians) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "new") {
                let bench = path.join("benchmark.json");
                let estimates = path.join("estimates.json");
                if bench.is_file() && estimates.is_file() {
                    let b: Value = serde_json::from_str(&std::fs::read_to_string(&bench)?)?;
                    let e: Value = serde_json::from_str(&std::fs::read_to_string(&estimates)?)?;
                    if let (Some(id), Some(ns)) = (
                        b.get("full_id").and_then(Value::as_str),
                        e.pointer("/median/point_estimate").and_then(Value::as_f64),
                    ) {
                        out.insert(id.to_string(), ns);
                    }
                }
            } else if path
                .file_name()
                .is_none_or(|n| n != "base" && n != "change")
            {
                collect(&path, out)?;
            }
        }
    }
    Ok(())
}

fn dur(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn get(m: &Medians, id: &str) -> Option<f64> {
    m.get(id).copied()
}

/// One MLS row, per `per` operations: ours beside raw openmls on SQLite
/// (the peer: ratio and verdict) and raw openmls in memory (the limit).
fn mls_row(rows: &mut String, what: &str, [ours, sqlite, memory]: [Option<f64>; 3], per: f64) {
    let Some(o) = ours else {
        return;
    };
    if sqlite.is_none() && memory.is_none() {
        return;
    }
    let cell = |v: Option<f64>| v.map_or("—".into(), |v| dur(v / per));
    let ratio = |v: Option<f64>| v.map_or("—".into(), |v| format!("{:.2}", o / v));
    let met = sqlite.map_or("—", |s| if o / s <= MLS_TARGET { "yes" } else { "**no**" });
    rows.push_str(&format!(
        "| {what} | {} | {} | {} | {met} | {} | {} |\n",
        dur(o / per),
        cell(sqlite),
        ratio(sqlite),
        cell(memory),
        ratio(memory),
    ));
}

/// Ours, raw openmls on SQLite and raw openmls in memory for benchmark
/// `group/id/<who>[/suffix]`.
fn mls_trio(m: &Medians, group: &str, id: &str, suffix: &str) -> [Option<f64>; 3] {
    ["ours", "openmls_sqlite", "openmls"].map(|who| get(m, &format!("{group}/{id}/{who}{suffix}")))
}

fn mls(m: &Medians) -> String {
    let mut rows = String::new();
    let single = [
        ("key_package", "key package"),
        ("create_add_merge", "create a group, add one member, merge"),
        ("join", "join from a Welcome"),
        ("encrypt_decrypt_256B", "encrypt + decrypt 256 B (N = 2)"),
    ];
    for (id, what) in single {
        mls_row(&mut rows, what, mls_trio(m, "mls", id, ""), 1.0);
    }
    let mut sizes: Vec<u64> = m
        .keys()
        .filter_map(|k| k.strip_prefix("mls_size/encrypt_decrypt_256B/ours/"))
        .filter_map(|n| n.parse().ok())
        .collect();
    sizes.sort_unstable();
    let sized = [
        ("self_update_process", "self-update commit + process"),
        ("encrypt_decrypt_256B", "encrypt + decrypt 256 B"),
        ("add_remove", "add one member + merge, remove it + merge"),
    ];
    for (id, what) in sized {
        for n in &sizes {
            mls_row(
                &mut rows,
                &format!("{what}, N = {n}"),
                mls_trio(m, "mls_size", id, &format!("/{n}")),
                1.0,
            );
        }
    }
    mls_row(
        &mut rows,
        "receive a backlog: 100 messages in one `process_batch`, per message",
        mls_trio(m, "mls_receive", "process_batch", "/100"),
        100.0,
    );
    if rows.is_empty() {
        return String::new();
    }
    let floor = get(m, "mls_receive/fsync_floor").map_or(String::new(), |f| {
        format!(
            "\nThe disk's fsync floor in the same run (one 4 KiB block overwritten and `fdatasync`ed): {}; every single operation of ours commits once, so it costs at least that.\n",
            dur(f)
        )
    });
    format!(
        "MLS operations, ours (SQLCipher profile, `synchronous=FULL`, `secure_delete=ON`) beside raw openmls with the same group configuration: on openmls's SQLite storage provider (a plain SQLite file per member, WAL, `synchronous=FULL`, JSON as openmls's own SQLite setup, one transaction where ours commits one: the peer, target at most {MLS_TARGET} ×) and on its in-memory storage (no persistence: the limit):\n\n\
         | operation | ours | raw openmls, SQLite | ratio | met | raw openmls, in memory | ratio |\n|---|---|---|---|---|---|---|\n{rows}{floor}"
    )
}

fn store(m: &Medians) -> String {
    let cell = |id: &str, per: f64| get(m, id).map_or("—".into(), |ns| dur(ns / per));
    let mut rows = String::new();
    for (group, what, per) in [
        ("store_enqueue_1", "one enqueue at a time, per enqueue", 1.0),
        (
            "store_enqueue_64",
            "64 enqueues in flight, per enqueue",
            64.0,
        ),
        (
            "store_fetch_100",
            "fetch 100 queued messages, per message",
            100.0,
        ),
    ] {
        if get(m, &format!("{group}/sqlcipher_store")).is_none() {
            continue;
        }
        let ratio = match (
            get(m, &format!("{group}/sqlcipher_store")),
            get(m, &format!("{group}/raw_sqlite")),
        ) {
            (Some(o), Some(r)) => format!("{:.1}", o / r),
            _ => "—".into(),
        };
        rows.push_str(&format!(
            "| {what} | {} | {} | {} | {} | {ratio} |\n",
            cell(&format!("{group}/fsync_floor"), per),
            cell(&format!("{group}/raw_sqlite"), per),
            cell(&format!("{group}/plain_store"), per),
            cell(&format!("{group}/sqlcipher_store"), per),
        ));
    }
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "The server's store beside its floors on the same disk:\n\n\
         | scenario | fsync floor | raw SQLite | our store, unencrypted | our store, SQLCipher | SQLCipher store ÷ raw SQLite |\n|---|---|---|---|---|---|\n{rows}"
    )
}

/// The block for the page, from criterion's output directory.
pub fn render(dir: &Path, heading: &str) -> anyhow::Result<String> {
    let mut m = Medians::new();
    collect(dir, &mut m)?;
    let body = [mls(&m), store(&m)]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    anyhow::ensure!(
        !body.is_empty(),
        "no criterion results in {}",
        dir.display()
    );
    Ok(format!("{BEGIN}\n{heading}\n\n{body}{END}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(root: &Path, dir: &str, full_id: &str, median_ns: f64) {
        let new = root.join(dir).join("new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(
            new.join("benchmark.json"),
            serde_json::json!({ "full_id": full_id }).to_string(),
        )
        .unwrap();
        std::fs::write(
            new.join("estimates.json"),
            serde_json::json!({ "median": { "point_estimate": median_ns } }).to_string(),
        )
        .unwrap();
        // criterion's earlier run of the same benchmark must not count
        let base = root.join(dir).join("base");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(
            base.join("estimates.json"),
            serde_json::json!({ "median": { "point_estimate": 1.0 } }).to_string(),
        )
        .unwrap();
    }

    #[test]
    fn renders_medians_ratios_and_verdicts_per_operation() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        bench(root, "mls/join_ours", "mls/join/ours", 1_200_000.0);
        bench(root, "mls/join_openmls", "mls/join/openmls", 800_000.0);
        bench(
            root,
            "mls/join_openmls_sqlite",
            "mls/join/openmls_sqlite",
            1_000_000.0,
        );
        bench(
            root,
            "mls_size/encrypt_decrypt_256B_ours/512",
            "mls_size/encrypt_decrypt_256B/ours/512",
            3_000_000.0,
        );
        bench(
            root,
            "mls_size/encrypt_decrypt_256B_openmls/512",
            "mls_size/encrypt_decrypt_256B/openmls/512",
            1_000_000.0,
        );
        bench(
            root,
            "mls_size/encrypt_decrypt_256B_openmls_sqlite/512",
            "mls_size/encrypt_decrypt_256B/openmls_sqlite/512",
            2_000_000.0,
        );
        bench(
            root,
            "mls_receive/process_batch_ours/100",
            "mls_receive/process_batch/ours/100",
            20_000_000.0,
        );
        bench(
            root,
            "mls_receive/process_batch_openmls/100",
            "mls_receive/process_batch/openmls/100",
            10_000_000.0,
        );
        bench(
            root,
            "mls_receive/fsync_floor",
            "mls_receive/fsync_floor",
            180_000.0,
        );
        bench(
            root,
            "store_enqueue_64/raw_sqlite",
            "store_enqueue_64/raw_sqlite",
            320_000.0,
        );
        bench(
            root,
            "store_enqueue_64/sqlcipher_store",
            "store_enqueue_64/sqlcipher_store",
            3_200_000.0,
        );

        let block = render(root, "heading").unwrap();
        assert!(block.starts_with(BEGIN) && block.ends_with(END));
        assert!(
            block.contains(
                "| join from a Welcome | 1.20 ms | 1.00 ms | 1.20 | yes | 800.0 µs | 1.50 |"
            ),
            "{block}"
        );
        assert!(
            block.contains(
                "| encrypt + decrypt 256 B, N = 512 | 3.00 ms | 2.00 ms | 1.50 | **no** | 1.00 ms | 3.00 |"
            ),
            "{block}"
        );
        // per message of the batch
        assert!(
            block.contains("per message | 200.0 µs | — | — | — | 100.0 µs | 2.00 |"),
            "{block}"
        );
        assert!(block.contains("180.0 µs"), "{block}");
        // per enqueue of the 64, with the ratio to raw SQLite
        assert!(
            block.contains(
                "| 64 enqueues in flight, per enqueue | — | 5.0 µs | — | 50.0 µs | 10.0 |"
            ),
            "{block}"
        );
    }

    #[test]
    fn an_empty_directory_is_an_error_not_an_empty_table() {
        let dir = tempfile::tempdir().unwrap();
        assert!(render(dir.path(), "heading").is_err());
    }
}
