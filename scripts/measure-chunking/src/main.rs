//! measure-chunking: how should pgcairn chunk and compress PostgreSQL files?
//!
//! Three sub-commands, driven by `scripts/measure-chunking.sh`:
//!
//! * `day --dir PGDATA --state DIR --day N [--exclude NAME]...`
//!   Walks the data directory (top-level names in `--exclude` are skipped, e.g. pg_wal),
//!   chunks every file with each candidate chunker (FastCDC v2020, seeded gear table, min =
//!   avg/4, max = avg*4, normalization level 1; plus fixed-size blocks for comparison), names
//!   each chunk by its keyed BLAKE3 hash, and records the unique chunks with their zstd-3
//!   compressed size in `DIR/dayN.txt`. Chunks already known from earlier days are not
//!   compressed again. Also records a whole-file hash per file (the unit of a file-level
//!   incremental backup such as pgBackRest's).
//! * `report --state DIR [--names FILE] [--breakdown LABEL,...]`
//!   Reads every `dayN.txt` and prints the dedup table: chunks per day, new unique chunks and
//!   bytes each later day adds, repository size after all days; then, for the chunkers named in
//!   `--breakdown`, which files the last day's new chunks come from (`--names` maps paths like
//!   `base/5/16397` to relation names, one "path name" pair a line).
//! * `speed --dir PGDATA --wal SEGMENT... [--avg BYTES] [--sample-mib N] [--reps N]`
//!   Single-thread throughput of the chunkers, BLAKE3 keyed hashing, and zstd compression /
//!   decompression per level, plus compression ratios, on a strided sample of the unique data
//!   chunks and on the given WAL segments (chunked the same way).
//!
//! Everything runs on one thread; timings are wall-clock with `Instant`, best of `--reps`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::exit;
use std::time::{Duration, Instant};

use fastcdc::v2020::{FastCDC, Normalization};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const AVG_SIZES: [usize; 6] = [64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, MIB, 2 * MIB];
/// Fixed, page-aligned block sizes: down to one 8 KiB page, since scattered updates touch
/// single pages and a larger block re-stores its untouched neighbours.
const FIXED_SIZES: [usize; 6] = [8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 256 * KIB, MIB];
const ZSTD_LEVELS: [i32; 6] = [1, 2, 3, 6, 9, 15];
/// zstd level used for the dedup/repository-size table.
const REPO_LEVEL: i32 = 3;
/// Assumed bytes per repository index entry: 32-byte chunk id + pack/offset/length reference.
const INDEX_ENTRY_BYTES: usize = 48;
/// Assumed bytes per chunk reference in a backup manifest (32-byte id + length).
const MANIFEST_ENTRY_BYTES: usize = 40;

/// Reference point: pgBackRest 2.45 full backup of ~578 MB, zstd level 3, process-max 2, on
/// this class of machine (scripts from the project's baseline measurements).
const PGBACKREST_FULL_MB: f64 = 578.0;
const PGBACKREST_FULL_S: f64 = 11.6;

type Id = [u8; 32];
/// chunker label -> (raw, compressed) bytes
type PerLabel<'a> = HashMap<&'a str, (u64, u64)>;

// ---------------------------------------------------------------------------------------------
// Keys and chunkers
// ---------------------------------------------------------------------------------------------

/// Stand-in for the repository key: the product derives both the chunk-id key and the gear seed
/// from its master key; here they come from a fixed test secret so runs are reproducible.
const TEST_KEY_MATERIAL: &[u8] = b"pgcairn measure-chunking fixed test key material";

fn chunk_id_key() -> [u8; 32] {
    blake3::derive_key("pgcairn measure-chunking 2025 chunk id", TEST_KEY_MATERIAL)
}

fn gear_seed() -> u64 {
    let k = blake3::derive_key("pgcairn measure-chunking 2025 gear seed", TEST_KEY_MATERIAL);
    let seed = u64::from_le_bytes(k[..8].try_into().unwrap());
    if seed == 0 {
        1
    } else {
        seed
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cdc,
    Fixed,
}

#[derive(Clone, Copy)]
struct Chunker {
    kind: Kind,
    avg: usize,
}

impl Chunker {
    fn min(&self) -> usize {
        self.avg / 4
    }
    fn max(&self) -> usize {
        self.avg * 4
    }
    fn label(&self) -> String {
        let k = match self.kind {
            Kind::Cdc => "cdc",
            Kind::Fixed => "fixed",
        };
        format!("{k}-{}", human_size(self.avg))
    }
    fn sizes(&self) -> String {
        match self.kind {
            Kind::Cdc => format!(
                "{}/{}/{}",
                human_size(self.min()),
                human_size(self.avg),
                human_size(self.max())
            ),
            Kind::Fixed => format!("{} blocks", human_size(self.avg)),
        }
    }

    /// (offset, length) of every chunk of `data`.
    fn cut(&self, data: &[u8], seed: u64, out: &mut Vec<(usize, usize)>) {
        out.clear();
        match self.kind {
            Kind::Cdc => {
                let cdc = FastCDC::with_level_and_seed(
                    data,
                    self.min(),
                    self.avg,
                    self.max(),
                    Normalization::Level1,
                    seed,
                );
                out.extend(cdc.map(|c| (c.offset, c.length)));
            }
            Kind::Fixed => {
                let mut off = 0;
                while off < data.len() {
                    let len = self.avg.min(data.len() - off);
                    out.push((off, len));
                    off += len;
                }
            }
        }
    }
}

fn all_chunkers() -> Vec<Chunker> {
    let mut v: Vec<Chunker> = AVG_SIZES
        .iter()
        .map(|&avg| Chunker { kind: Kind::Cdc, avg })
        .collect();
    v.extend(FIXED_SIZES.iter().map(|&avg| Chunker { kind: Kind::Fixed, avg }));
    v
}

fn human_size(n: usize) -> String {
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{}M", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{}K", n / KIB)
    } else {
        format!("{n}")
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn die(msg: &str) -> ! {
    eprintln!("measure-chunking: {msg}");
    exit(2)
}

fn to_hex(id: &Id) -> String {
    let mut s = String::with_capacity(64);
    for b in id {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn from_hex(s: &str) -> Id {
    if s.len() != 64 {
        die(&format!("bad hash in state file: {s}"));
    }
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .unwrap_or_else(|_| die(&format!("bad hash in state file: {s}")));
    }
    id
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s == 0.0 {
        f64::INFINITY
    } else {
        bytes as f64 / 1e6 / s
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Regular files under `dir`, sorted, skipping top-level entries named in `exclude`.
/// Symlinks are not followed (pg_wal and tablespaces may be links).
fn walk(dir: &Path, exclude: &[String]) -> Vec<PathBuf> {
    fn rec(p: &Path, top: bool, exclude: &[String], out: &mut Vec<PathBuf>) {
        let rd = match fs::read_dir(p) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => die(&format!("read_dir {}: {e}", p.display())),
        };
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if top && exclude.contains(&name) {
                continue;
            }
            let ft = match ent.file_type() {
                Ok(ft) => ft,
                Err(_) => continue,
            };
            if ft.is_dir() {
                rec(&ent.path(), false, exclude, out);
            } else if ft.is_file() {
                out.push(ent.path());
            }
        }
    }
    let mut out = Vec::new();
    rec(dir, true, exclude, &mut out);
    out.sort();
    out
}

/// Reads a file that a running server may remove meanwhile (temporary stats files etc.).
fn read_file(p: &Path) -> Option<Vec<u8>> {
    match fs::read(p) {
        Ok(d) => Some(d),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => die(&format!("read {}: {e}", p.display())),
    }
}

struct Zstd {
    c: zstd::bulk::Compressor<'static>,
    buf: Vec<u8>,
}

impl Zstd {
    fn new(level: i32) -> Self {
        Zstd {
            c: zstd::bulk::Compressor::new(level).unwrap_or_else(|e| die(&format!("zstd: {e}"))),
            buf: Vec::new(),
        }
    }
    fn compressed_len(&mut self, data: &[u8]) -> usize {
        self.buf.clear();
        self.buf.reserve(zstd::compress_bound(data.len()));
        self.c
            .compress_to_buffer(data, &mut self.buf)
            .unwrap_or_else(|e| die(&format!("zstd compress: {e}")))
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------

struct Args {
    opts: HashMap<String, Vec<String>>,
}

impl Args {
    /// `--name value` pairs; a name may repeat, and `--wal` takes every following non-option word.
    fn parse(argv: &[String]) -> Self {
        let mut opts: HashMap<String, Vec<String>> = HashMap::new();
        let mut i = 0;
        while i < argv.len() {
            let a = &argv[i];
            let Some(name) = a.strip_prefix("--") else {
                die(&format!("unexpected argument {a}"));
            };
            i += 1;
            let vals = opts.entry(name.to_string()).or_default();
            let mut n = 0;
            while i < argv.len() && !argv[i].starts_with("--") {
                vals.push(argv[i].clone());
                i += 1;
                n += 1;
                if name != "wal" {
                    break;
                }
            }
            if n == 0 {
                die(&format!("--{name} needs a value"));
            }
        }
        Args { opts }
    }
    fn one(&self, name: &str) -> Option<&str> {
        self.opts.get(name).and_then(|v| v.last()).map(|s| s.as_str())
    }
    fn req(&self, name: &str) -> &str {
        self.one(name).unwrap_or_else(|| die(&format!("--{name} is required")))
    }
    fn many(&self, name: &str) -> Vec<String> {
        self.opts.get(name).cloned().unwrap_or_default()
    }
    fn num(&self, name: &str, default: usize) -> usize {
        self.one(name)
            .map(|s| s.parse().unwrap_or_else(|_| die(&format!("--{name}: not a number: {s}"))))
            .unwrap_or(default)
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        eprintln!(
            "usage: measure-chunking day --dir PGDATA --state DIR --day N [--exclude NAME]...\n\
             \x20      measure-chunking report --state DIR [--names FILE] [--breakdown LABEL,...]\n\
             \x20      measure-chunking speed --dir PGDATA [--exclude NAME]... --wal SEG... \
             [--avg BYTES] [--sample-mib N] [--reps N]"
        );
        exit(2);
    };
    let args = Args::parse(&argv[1..]);
    match cmd.as_str() {
        "day" => cmd_day(&args),
        "report" => cmd_report(&args),
        "speed" => cmd_speed(&args),
        other => die(&format!("unknown command {other}")),
    }
}

// ---------------------------------------------------------------------------------------------
// State files
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct ChunkerDay {
    chunks: u64,
    bytes: u64,
    chunk_ns: u64,
    /// unique chunk id -> (raw length, zstd-3 length)
    unique: HashMap<Id, (u32, u32)>,
    /// path -> (raw, zstd-3) bytes of chunks first seen in this file on this day
    new_by_file: BTreeMap<String, (u64, u64)>,
}

#[derive(Default)]
struct DayState {
    day: u32,
    /// path (relative to the data directory) -> (whole-file id, raw length, zstd-3 length)
    files: BTreeMap<String, (Id, u64, u64)>,
    chunkers: BTreeMap<String, ChunkerDay>,
}

fn state_path(dir: &Path, day: u32) -> PathBuf {
    dir.join(format!("day{day}.txt"))
}

fn write_state(path: &Path, st: &DayState) {
    let tmp = path.with_extension("tmp");
    let f = fs::File::create(&tmp).unwrap_or_else(|e| die(&format!("{}: {e}", tmp.display())));
    let mut w = BufWriter::new(f);
    let r: io::Result<()> = (|| {
        writeln!(w, "# measure-chunking state v1")?;
        writeln!(w, "D {}", st.day)?;
        for (p, (id, len, clen)) in &st.files {
            writeln!(w, "F {} {len} {clen} {p}", to_hex(id))?;
        }
        for (label, cd) in &st.chunkers {
            writeln!(w, "C {label} {} {} {}", cd.chunks, cd.bytes, cd.chunk_ns)?;
            let mut ids: Vec<_> = cd.unique.iter().collect();
            ids.sort();
            for (id, (len, clen)) in ids {
                writeln!(w, "U {label} {} {len} {clen}", to_hex(id))?;
            }
            for (p, (raw, clen)) in &cd.new_by_file {
                writeln!(w, "N {label} {raw} {clen} {p}")?;
            }
        }
        w.flush()
    })();
    r.unwrap_or_else(|e| die(&format!("{}: {e}", tmp.display())));
    drop(w);
    fs::rename(&tmp, path).unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
}

fn read_state(path: &Path) -> DayState {
    let f = fs::File::open(path).unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
    let mut st = DayState::default();
    let bad = |l: &str| -> ! { die(&format!("{}: bad line: {l}", path.display())) };
    for line in BufReader::new(f).lines() {
        let line = line.unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.splitn(5, ' ').collect();
        let num = |i: usize| -> u64 {
            parts
                .get(i)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| bad(&line))
        };
        match parts[0] {
            "D" => st.day = num(1) as u32,
            "F" if parts.len() == 5 => {
                st.files
                    .insert(parts[4].to_string(), (from_hex(parts[1]), num(2), num(3)));
            }
            "C" if parts.len() == 5 => {
                let cd = st.chunkers.entry(parts[1].to_string()).or_default();
                cd.chunks = num(2);
                cd.bytes = num(3);
                cd.chunk_ns = num(4);
            }
            "N" if parts.len() == 5 => {
                let cd = st.chunkers.entry(parts[1].to_string()).or_default();
                cd.new_by_file.insert(parts[4].to_string(), (num(2), num(3)));
            }
            "U" if parts.len() == 5 => {
                let cd = st.chunkers.entry(parts[1].to_string()).or_default();
                cd.unique
                    .insert(from_hex(parts[2]), (num(3) as u32, num(4) as u32));
            }
            _ => bad(&line),
        }
    }
    st
}

fn load_states(dir: &Path) -> Vec<DayState> {
    let mut days: Vec<u32> = fs::read_dir(dir)
        .unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())))
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("day")?.strip_suffix(".txt")?.parse().ok()
        })
        .collect();
    days.sort();
    days.iter().map(|&d| read_state(&state_path(dir, d))).collect()
}

// ---------------------------------------------------------------------------------------------
// day
// ---------------------------------------------------------------------------------------------

fn cmd_day(args: &Args) {
    let dir = PathBuf::from(args.req("dir"));
    let state_dir = PathBuf::from(args.req("state"));
    let day = args.num("day", usize::MAX);
    if day == usize::MAX {
        die("--day is required");
    }
    let day = day as u32;
    let exclude = args.many("exclude");
    fs::create_dir_all(&state_dir).unwrap_or_else(|e| die(&format!("{}: {e}", state_dir.display())));

    // Compressed sizes already known from earlier days: never compress the same chunk twice.
    let earlier: Vec<DayState> = load_states(&state_dir)
        .into_iter()
        .filter(|s| s.day < day)
        .collect();
    let mut known_chunk: HashMap<String, HashMap<Id, u32>> = HashMap::new();
    let mut earlier_ids: HashMap<String, HashSet<Id>> = HashMap::new();
    let mut known_file: HashMap<Id, u64> = HashMap::new();
    for s in &earlier {
        for (label, cd) in &s.chunkers {
            let m = known_chunk.entry(label.clone()).or_default();
            for (id, (_, clen)) in &cd.unique {
                m.insert(*id, *clen);
            }
            earlier_ids
                .entry(label.clone())
                .or_default()
                .extend(cd.unique.keys().copied());
        }
        for (id, _, clen) in s.files.values() {
            known_file.insert(*id, *clen);
        }
    }

    let key = chunk_id_key();
    let seed = gear_seed();
    let chunkers = all_chunkers();
    let mut st = DayState {
        day,
        ..Default::default()
    };
    for c in &chunkers {
        st.chunkers.insert(c.label(), ChunkerDay::default());
    }
    let mut z = Zstd::new(REPO_LEVEL);
    let mut cuts = Vec::new();
    let files = walk(&dir, &exclude);
    let t_all = Instant::now();
    let mut total = 0u64;
    for path in &files {
        let Some(data) = read_file(path) else { continue };
        let rel = path
            .strip_prefix(&dir)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        total += data.len() as u64;
        let fid = *blake3::keyed_hash(&key, &data).as_bytes();
        let fclen = match known_file.get(&fid) {
            Some(&c) => c,
            None => {
                let c = z.compressed_len(&data) as u64;
                known_file.insert(fid, c);
                c
            }
        };
        st.files.insert(rel.clone(), (fid, data.len() as u64, fclen));
        if data.is_empty() {
            continue;
        }
        for c in &chunkers {
            let label = c.label();
            let t = Instant::now();
            c.cut(&data, seed, &mut cuts);
            let ns = t.elapsed().as_nanos() as u64;
            let known = known_chunk.entry(label.clone()).or_default();
            let earlier = earlier_ids.entry(label.clone()).or_default();
            let cd = st.chunkers.get_mut(&label).unwrap();
            let (mut new_raw, mut new_c) = (0u64, 0u64);
            cd.chunk_ns += ns;
            cd.chunks += cuts.len() as u64;
            cd.bytes += data.len() as u64;
            for &(off, len) in &cuts {
                let chunk = &data[off..off + len];
                let id = *blake3::keyed_hash(&key, chunk).as_bytes();
                if cd.unique.contains_key(&id) {
                    continue;
                }
                let clen = match known.get(&id) {
                    Some(&c) => c,
                    None => {
                        let c = z.compressed_len(chunk) as u32;
                        known.insert(id, c);
                        c
                    }
                };
                cd.unique.insert(id, (len as u32, clen));
                if !earlier.contains(&id) {
                    new_raw += len as u64;
                    new_c += clen as u64;
                }
            }
            if new_raw > 0 {
                cd.new_by_file.insert(rel.clone(), (new_raw, new_c));
            }
        }
    }
    write_state(&state_path(&state_dir, day), &st);
    eprintln!(
        "day {day}: {} files, {:.1} MiB in {:.1} s (load {}) -> {}",
        st.files.len(),
        mib(total),
        t_all.elapsed().as_secs_f64(),
        loadavg(),
        state_path(&state_dir, day).display()
    );
}

// ---------------------------------------------------------------------------------------------
// report
// ---------------------------------------------------------------------------------------------

/// "base/5/16397_fsm" -> "pgbench_accounts_fsm" given "base/5/16397 pgbench_accounts".
fn relation_name(names: &HashMap<String, String>, path: &str) -> String {
    if let Some(n) = names.get(path) {
        return n.clone();
    }
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    let cut = file.find(['_', '.']).unwrap_or(file.len());
    let base = if dir.is_empty() {
        file[..cut].to_string()
    } else {
        format!("{dir}/{}", &file[..cut])
    };
    match names.get(&base) {
        Some(n) => format!("{n}{}", &file[cut..]),
        None => "-".into(),
    }
}

fn cmd_report(args: &Args) {
    let state_dir = PathBuf::from(args.req("state"));
    let states = load_states(&state_dir);
    if states.is_empty() {
        die("no dayN.txt state files");
    }
    let first = &states[0];
    let later = &states[1..];
    let mut out = String::new();

    let data_bytes: u64 = first.files.values().map(|f| f.1).sum();
    let _ = writeln!(
        out,
        "### Dedup: day {} full, then what each later day adds\n\n\
         Data directory without pg_wal: {} files, {:.1} MiB on day {}. Chunk ids are keyed BLAKE3; \
         sizes are zstd level {REPO_LEVEL}, each chunk compressed on its own. \
         `new` = unique chunks not present on any earlier day (the incremental upload). \
         Index = ids in repo x {INDEX_ENTRY_BYTES} B; manifest = chunks per backup x {MANIFEST_ENTRY_BYTES} B.\n",
        first.day,
        first.files.len(),
        mib(data_bytes),
        first.day
    );

    let mut hdr = format!(
        "| chunker | min/avg/max | d{0} chunks | d{0} unique | d{0} stored MiB (zstd{1}) |",
        first.day, REPO_LEVEL
    );
    let mut sep = String::from("|---|---|---:|---:|---:|");
    for s in later {
        let _ = write!(
            hdr,
            " d{0} chunks | d{0} new unique | d{0} new raw MiB | d{0} new MiB (zstd{1}) |",
            s.day, REPO_LEVEL
        );
        sep.push_str("---:|---:|---:|---:|");
    }
    hdr.push_str(" repo MiB after all days | ids in repo | index KiB | manifest KiB/backup | chunking MB/s (1 thread, d0) |");
    sep.push_str("---:|---:|---:|---:|---:|");
    let _ = writeln!(out, "{hdr}\n{sep}");

    for c in all_chunkers() {
        let label = c.label();
        let mut seen: HashSet<Id> = HashSet::new();
        let mut repo_c: u64 = 0;
        let mut max_chunks = 0u64;
        let mut cells: Vec<String> = vec![label.clone(), c.sizes()];
        let mut speed = String::from("-");
        for (i, s) in states.iter().enumerate() {
            let Some(cd) = s.chunkers.get(&label) else {
                die(&format!("day {} has no {label}", s.day))
            };
            max_chunks = max_chunks.max(cd.chunks);
            let (mut new_n, mut new_raw, mut new_c) = (0u64, 0u64, 0u64);
            for (id, (len, clen)) in &cd.unique {
                if seen.insert(*id) {
                    new_n += 1;
                    new_raw += *len as u64;
                    new_c += *clen as u64;
                }
            }
            repo_c += new_c;
            if i == 0 {
                if c.kind == Kind::Cdc {
                    speed = format!("{:.0}", mb_per_s(cd.bytes, Duration::from_nanos(cd.chunk_ns)));
                }
                cells.push(cd.chunks.to_string());
                cells.push(cd.unique.len().to_string());
                cells.push(format!("{:.1}", mib(new_c)));
            } else {
                cells.push(cd.chunks.to_string());
                cells.push(new_n.to_string());
                cells.push(format!("{:.2}", mib(new_raw)));
                cells.push(format!("{:.2}", mib(new_c)));
            }
        }
        cells.push(format!("{:.1}", mib(repo_c)));
        cells.push(seen.len().to_string());
        cells.push(format!("{:.0}", (seen.len() * INDEX_ENTRY_BYTES) as f64 / KIB as f64));
        cells.push(format!(
            "{:.0}",
            (max_chunks as usize * MANIFEST_ENTRY_BYTES) as f64 / KIB as f64
        ));
        cells.push(speed);
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }

    // Whole-file row: what a file-level incremental (pgBackRest full + incr) would store.
    {
        let mut row = format!(
            "| whole files (pgBackRest-like full+incr, no dedup) | - | {} | - | {:.1} |",
            first.files.len(),
            mib(first.files.values().map(|f| f.2).sum())
        );
        let mut repo = first.files.values().map(|f| f.2).sum::<u64>();
        let mut prev = &first.files;
        for s in later {
            let mut n = 0u64;
            let mut raw = 0u64;
            let mut cz = 0u64;
            for (p, (id, len, clen)) in &s.files {
                if prev.get(p).map(|f| &f.0) != Some(id) {
                    n += 1;
                    raw += len;
                    cz += clen;
                }
            }
            repo += cz;
            let _ = write!(
                row,
                " {} | {n} changed files | {:.2} | {:.2} |",
                s.files.len(),
                mib(raw),
                mib(cz)
            );
            prev = &s.files;
        }
        let _ = writeln!(out, "{row} {:.1} | - | - | - | - |", mib(repo));
    }
    // Which files the last day's new chunks come from.
    if let Some(last) = later.last() {
        let labels: Vec<String> = args
            .one("breakdown")
            .unwrap_or("cdc-256K,cdc-1M,fixed-8K,fixed-16K,fixed-32K,fixed-64K")
            .split(',')
            .map(str::to_string)
            .collect();
        let names: HashMap<String, String> = args
            .one("names")
            .and_then(|p| fs::read_to_string(p).ok())
            .map(|t| {
                t.lines()
                    .filter_map(|l| l.split_once(' '))
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let mut total_new: HashMap<&str, (u64, u64)> = HashMap::new();
        let mut files: BTreeMap<&str, PerLabel> = BTreeMap::new();
        for l in &labels {
            let Some(cd) = last.chunkers.get(l) else { continue };
            for (p, v) in &cd.new_by_file {
                files.entry(p.as_str()).or_default().insert(l.as_str(), *v);
                let t = total_new.entry(l.as_str()).or_default();
                t.0 += v.0;
                t.1 += v.1;
            }
        }
        let mut rows: Vec<(&str, &PerLabel)> =
            files.iter().map(|(p, m)| (*p, m)).collect();
        // Sort by the largest raw contribution under any of the chunkers shown.
        rows.sort_by_key(|(_, m)| std::cmp::Reverse(m.values().map(|v| v.0).max().unwrap_or(0)));
        let _ = writeln!(
            out,
            "\n### Where day {}'s new chunks come from (top files; raw MiB / zstd{REPO_LEVEL} MiB)\n",
            last.day
        );
        let mut hdr = String::from("| file | relation | size MiB |");
        let mut sep = String::from("|---|---|---:|");
        for l in &labels {
            let _ = write!(hdr, " {l} new |");
            sep.push_str("---:|");
        }
        let _ = writeln!(out, "{hdr}\n{sep}");
        for (p, m) in rows.iter().take(12) {
            let size = last.files.get(*p).map(|f| f.1).unwrap_or(0);
            let mut row = format!("| {p} | {} | {:.1} |", relation_name(&names, p), mib(size));
            for l in &labels {
                let (r, c) = m.get(l.as_str()).copied().unwrap_or((0, 0));
                let _ = write!(row, " {:.1} / {:.2} |", mib(r), mib(c));
            }
            let _ = writeln!(out, "{row}");
        }
        let mut row = format!("| all {} files with new chunks | | |", files.len());
        for l in &labels {
            let (r, c) = total_new.get(l.as_str()).copied().unwrap_or((0, 0));
            let _ = write!(row, " {:.1} / {:.2} |", mib(r), mib(c));
        }
        let _ = writeln!(out, "{row}");
    }
    print!("{out}");
}

// ---------------------------------------------------------------------------------------------
// speed
// ---------------------------------------------------------------------------------------------

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
    }
    best
}

struct LevelResult {
    ratio: f64,
    comp: f64,
    decomp: f64,
}

fn measure_level(chunks: &[Vec<u8>], level: i32, reps: usize) -> LevelResult {
    let raw: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let mut comp = zstd::bulk::Compressor::new(level).unwrap_or_else(|e| die(&format!("zstd: {e}")));
    let mut outs: Vec<Vec<u8>> = chunks
        .iter()
        .map(|c| Vec::with_capacity(zstd::compress_bound(c.len())))
        .collect();
    // Slow levels: a single pass is long enough to be stable.
    let creps = if level >= 9 { 1 } else { reps };
    let ct = best_of(creps, || {
        for (c, o) in chunks.iter().zip(outs.iter_mut()) {
            o.clear();
            comp.compress_to_buffer(c.as_slice(), o)
                .unwrap_or_else(|e| die(&format!("zstd compress: {e}")));
        }
    });
    let csize: u64 = outs.iter().map(|o| o.len() as u64).sum();
    let mut dec = zstd::bulk::Decompressor::new().unwrap_or_else(|e| die(&format!("zstd: {e}")));
    let mut back: Vec<Vec<u8>> = chunks.iter().map(|c| Vec::with_capacity(c.len())).collect();
    let dt = best_of(reps, || {
        for (o, b) in outs.iter().zip(back.iter_mut()) {
            b.clear();
            dec.decompress_to_buffer(o.as_slice(), b)
                .unwrap_or_else(|e| die(&format!("zstd decompress: {e}")));
        }
    });
    for (c, b) in chunks.iter().zip(back.iter()) {
        if c != b {
            die("zstd round trip mismatch");
        }
    }
    LevelResult {
        ratio: raw as f64 / csize as f64,
        comp: mb_per_s(raw, ct),
        decomp: mb_per_s(raw, dt),
    }
}

fn cmd_speed(args: &Args) {
    let dir = PathBuf::from(args.req("dir"));
    let exclude = args.many("exclude");
    let wal = args.many("wal");
    let avg = args.num("avg", MIB);
    let sample_budget = args.num("sample-mib", 256) * MIB;
    let reps = args.num("reps", 3);
    let key = chunk_id_key();
    let seed = gear_seed();
    let chunker = Chunker { kind: Kind::Cdc, avg };

    // Unique data chunks at the chosen size, then a strided sample of them.
    let mut cuts = Vec::new();
    let mut seen: HashSet<Id> = HashSet::new();
    let mut uniq: Vec<Vec<u8>> = Vec::new();
    let mut data_total = 0u64;
    for p in walk(&dir, &exclude) {
        let Some(data) = read_file(&p) else { continue };
        data_total += data.len() as u64;
        chunker.cut(&data, seed, &mut cuts);
        for &(off, len) in &cuts {
            let ch = &data[off..off + len];
            if seen.insert(*blake3::keyed_hash(&key, ch).as_bytes()) {
                uniq.push(ch.to_vec());
            }
        }
    }
    let uniq_bytes: usize = uniq.iter().map(|c| c.len()).sum();
    let stride = uniq_bytes.div_ceil(sample_budget.max(1)).max(1);
    let sample: Vec<Vec<u8>> = uniq.into_iter().step_by(stride).collect();
    let sample_bytes: u64 = sample.iter().map(|c| c.len() as u64).sum();

    let mut wal_chunks: Vec<Vec<u8>> = Vec::new();
    let mut wal_bytes = 0u64;
    for p in &wal {
        let data = fs::read(p).unwrap_or_else(|e| die(&format!("{p}: {e}")));
        wal_bytes += data.len() as u64;
        chunker.cut(&data, seed, &mut cuts);
        wal_chunks.extend(cuts.iter().map(|&(o, l)| data[o..o + l].to_vec()));
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Single-thread speed and compression (chunks: FastCDC {}, seeded)\n\n\
         Data sample: {} unique chunks, {:.1} MiB (one in {stride} unique chunks of {:.1} MiB unique / {:.1} MiB total). \
         WAL: {} segments, {:.1} MiB, {} chunks. Best of {reps} runs (1 run for zstd compression at level >= 9). \
         Load average at start: {}.\n",
        chunker.sizes(),
        sample.len(),
        mib(sample_bytes),
        mib(uniq_bytes as u64),
        mib(data_total),
        wal.len(),
        mib(wal_bytes),
        wal_chunks.len(),
        loadavg()
    );

    // Chunking throughput over one contiguous buffer made of the sampled data chunks.
    let buf: Vec<u8> = sample.concat();
    let _ = writeln!(out, "| chunker (min/avg/max) | chunks in sample | MB/s |\n|---|---:|---:|");
    let mut chunk_speed = HashMap::new();
    for &a in &AVG_SIZES {
        let c = Chunker { kind: Kind::Cdc, avg: a };
        let mut n = 0;
        let d = best_of(reps, || {
            c.cut(&buf, seed, &mut cuts);
            n = cuts.len();
        });
        let s = mb_per_s(buf.len() as u64, d);
        chunk_speed.insert(a, s);
        let _ = writeln!(out, "| {} | {n} | {s:.0} |", c.sizes());
    }

    // BLAKE3 keyed hash over the sampled chunks (one call per chunk, as a chunk id).
    let mut sink = 0u8;
    let d = best_of(reps, || {
        for c in &sample {
            sink ^= blake3::keyed_hash(&key, c).as_bytes()[0];
        }
    });
    let blake_speed = mb_per_s(sample_bytes, d);
    let big = best_of(reps, || {
        sink ^= blake3::keyed_hash(&key, &buf).as_bytes()[0];
    });
    let _ = writeln!(
        out,
        "\nBLAKE3 keyed hash, 1 thread: {blake_speed:.0} MB/s per {} chunk, {:.0} MB/s over one {:.0} MiB buffer (x{sink:02x}).\n",
        human_size(avg),
        mb_per_s(buf.len() as u64, big),
        mib(buf.len() as u64)
    );

    let cs = chunk_speed.get(&avg).copied().unwrap_or(f64::NAN);
    let _ = writeln!(
        out,
        "| zstd level | data ratio | data compress MB/s | data decompress MB/s | WAL ratio | WAL compress MB/s | WAL decompress MB/s | est. 1-core s/GB (chunk+hash+zstd, data) | est. CPU s on 2 cores, this data ({:.0} MB) | est. CPU s on 2 cores, {:.0} MB (pgBackRest full: {PGBACKREST_FULL_S} s) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        data_total as f64 / 1e6,
        PGBACKREST_FULL_MB
    );
    for &lvl in &ZSTD_LEVELS {
        let d = measure_level(&sample, lvl, reps);
        let w = if wal_chunks.is_empty() {
            None
        } else {
            Some(measure_level(&wal_chunks, lvl, reps))
        };
        // Every byte is chunked and hashed; only unique bytes are compressed (day 0: ~all).
        let s_per_gb = 1000.0 / cs + 1000.0 / blake_speed + 1000.0 / d.comp;
        let full = s_per_gb * data_total as f64 / 1e9 / 2.0;
        let full_ref = s_per_gb * PGBACKREST_FULL_MB / 1e3 / 2.0;
        let (wr, wc, wd) = match &w {
            Some(w) => (
                format!("{:.2}", w.ratio),
                format!("{:.0}", w.comp),
                format!("{:.0}", w.decomp),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {lvl} | {:.2} | {:.0} | {:.0} | {wr} | {wc} | {wd} | {s_per_gb:.2} | {full:.1} | {full_ref:.1} |",
            d.ratio, d.comp, d.decomp
        );
    }
    print!("{out}");
}
