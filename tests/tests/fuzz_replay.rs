//! The fuzz targets (fuzz/src/lib.rs) in the test suite, as CI runs them: every input of the
//! committed corpora (`fuzz/corpus/<target>`, every past crash among them) and of the working
//! corpus a `cargo xtask fuzz` run left (`target/fuzz-corpus/<target>`), then random mutations
//! of them for a bounded time per target (`ZTUNNEL_FUZZ_SECONDS`, default 3). This is not
//! coverage-guided: `cargo xtask fuzz` (libFuzzer, nightly) is, and its build costs more than
//! the whole suite may spend; this catches what the corpora and their neighbourhood reach, on
//! the build the suite already has. An input that panics is saved to
//! `target/fuzz-replay/<target>/` and fails the test with how to reproduce it.

#[path = "../../fuzz/src/lib.rs"]
mod targets;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A target's body.
type Body = fn(&[u8]);

/// Each target, by the name of its directory under fuzz/corpus.
const TARGETS: [(&str, Body); 7] = [
    ("admin_query", targets::admin_query),
    ("ca_chain", targets::ca_chain),
    ("hbone_connect", targets::hbone_connect),
    ("local_config", targets::local_config),
    ("map_values", targets::map_values),
    ("xds_resource", targets::xds_resource),
    ("zds_request", targets::zds_request),
];

/// Inputs longer than this are cut (libFuzzer's `-max_len` in `cargo xtask fuzz`).
const MAX_LEN: usize = 65536;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn inputs(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    files.iter().filter_map(|f| std::fs::read(f).ok()).collect()
}

/// xorshift64*: a deterministic stream of numbers from one seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that make parsers take unusual branches: bounds of integer types, text delimiters.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0xff, b'\n', b'\r', b':', b'[', b']', b'%', b'=', b'&', b'"', b'-',
    b'{', b'}', b'/', b' ', b'0', b'9',
];

/// One to four libFuzzer-style mutations of `input` (with `other` to splice from).
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                out.drain(i..i + n);
            }
            4 if len > 0 => {
                // Repeat a slice (lists, nesting).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let copy = out[i..i + n].to_vec();
                let at = rng.below(out.len() + 1);
                out.splice(at..at, copy);
            }
            5 if !other.is_empty() => {
                // Splice: a prefix of this input, a suffix of another.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            6 if len > 0 => out.truncate(rng.below(len)),
            _ => {
                let i = rng.below(len + 1);
                let value = match rng.below(4) {
                    0 => u64::MAX.to_le_bytes().to_vec(),
                    1 => (u64::from(u32::MAX) + 1).to_le_bytes().to_vec(),
                    2 => (rng.next() as u16).to_be_bytes().to_vec(),
                    _ => vec![0xff; 1 + rng.below(4)],
                };
                out.splice(i..i, value);
            }
        }
    }
    out.truncate(MAX_LEN);
    out
}

/// Runs `body` on `input`; a panic saves the input and fails with where it is.
fn run_one(target: &str, body: Body, input: &[u8]) {
    if std::panic::catch_unwind(|| body(input)).is_ok() {
        return;
    }
    let dir = root().join("target/fuzz-replay").join(target);
    let _ = std::fs::create_dir_all(&dir);
    let name = format!("crash-{:016x}", {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        input.hash(&mut h);
        h.finish()
    });
    let path = dir.join(name);
    let _ = std::fs::write(&path, input);
    panic!(
        "fuzz target {target} panicked on {} ({} bytes): reproduce with `cargo +nightly fuzz run --sanitizer none {target} {}`, then add it to fuzz/corpus/{target}/ with the fix",
        path.display(),
        input.len(),
        path.display()
    );
}

#[test]
fn fuzz_targets_hold_on_their_corpora_and_mutations_of_them() {
    let seconds: u64 = std::env::var("ZTUNNEL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut report = Vec::new();
    for (target, body) in TARGETS {
        let mut corpus = inputs(&root().join("fuzz/corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} has no seeds: every target keeps some in the repository"
        );
        corpus.extend(inputs(&root().join("target/fuzz-corpus").join(target)));
        for input in &corpus {
            run_one(target, body, input);
        }
        // The same inputs every run of a day, different ones from day to day.
        let day = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 86_400);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ day ^ (target.len() as u64) << 32);
        let until = Instant::now() + Duration::from_secs(seconds);
        let mut runs = 0u64;
        while Instant::now() < until {
            for _ in 0..64 {
                let input = &corpus[rng.below(corpus.len())];
                let other = &corpus[rng.below(corpus.len())];
                run_one(target, body, &mutate(&mut rng, input, other));
                runs += 1;
            }
        }
        report.push(format!(
            "{target}: {} inputs, {runs} mutations",
            corpus.len()
        ));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn the_mutator_changes_inputs_and_respects_the_length_limit() {
    let mut rng = Rng(42);
    let seed = b"lines=10&level=debug".to_vec();
    let changed = (0..100)
        .filter(|_| mutate(&mut rng, &seed, b"pod=default/x") != seed)
        .count();
    assert!(
        changed > 90,
        "only {changed} of 100 mutations changed the input"
    );
    let big = vec![7u8; MAX_LEN];
    assert!((0..100).all(|_| mutate(&mut rng, &big, &big).len() <= MAX_LEN));
}
