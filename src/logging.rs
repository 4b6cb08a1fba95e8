//! Log output: JSON lines on stdout, written in batches by a background thread.
//!
//! Hand-written rather than `tracing_appender::non_blocking`, which wakes its writer thread
//! for every line: on a proxy pinned to a core or two, each call's access line then cost two
//! context switches and a `write` syscall. Here a line is copied into a shared buffer under a
//! short lock, and a flusher thread writes the buffer out every [`FLUSH_EVERY`] (sooner once
//! [`HIGH_WATER`] bytes wait), one `write` for many lines. If the reader of stdout falls
//! [`MAX_PENDING`] bytes behind, lines are dropped rather than blocking calls (the ledger, not
//! the log, is the record of calls), and the drop is itself logged.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a line may wait in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Buffered bytes that wake the flusher early.
pub const HIGH_WATER: usize = 256 * 1024;
/// Buffered bytes past which new lines are dropped.
pub const MAX_PENDING: usize = 64 * 1024 * 1024;

struct Shared {
    state: Mutex<Pending>,
    wake: Condvar,
    max_pending: usize,
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    dropped: u64,
    closed: bool,
}

/// The `MakeWriter` handed to the subscriber.
#[derive(Clone)]
pub struct LogWriter(Arc<Shared>);

/// Flushes what is buffered and stops the flusher when dropped (at exit).
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// One event's writer: copies into the shared buffer.
pub struct LogLine<'a>(&'a Shared);

/// Starts the flusher over `out`.
///
/// # Errors
/// When the thread cannot be spawned.
pub fn batched(out: impl Write + Send + 'static) -> std::io::Result<(LogWriter, LogGuard)> {
    batched_with(out, MAX_PENDING)
}

fn batched_with(
    out: impl Write + Send + 'static,
    max_pending: usize,
) -> std::io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        max_pending,
    });
    let flusher = shared.clone();
    let thread = std::thread::Builder::new()
        .name("log-flusher".to_owned())
        .spawn(move || flush_loop(&flusher, out))?;
    Ok((
        LogWriter(shared.clone()),
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

impl LogWriter {
    /// Queues one whole line (ending in a newline).
    pub fn write_line(&self, line: &[u8]) {
        let _ = LogLine(&self.0).write(line);
    }
}

/// Where access lines go: a function given each whole line.
pub type AccessSink = Box<dyn Fn(&[u8]) + Send + Sync>;

static ACCESS_SINK: OnceLock<AccessSink> = OnceLock::new();

/// Installs where access lines go, once per process (`serve` points it at the batched stdout
/// writer; a test may point it at a buffer). Returns false if one was already installed.
///
/// Access lines are not `tracing` events: one is written for every call, and the generic
/// JSON formatter (a visitor per field, a `serde_json::Value` per value, the timestamp through
/// `fmt`) cost a measurable share of a non-streamed call's CPU (see bench/HISTORY.md). [`AccessLine`] writes the same JSON
/// (same keys, same order, absent values left out) straight into a reused buffer. They still
/// obey the log filter: `MANTLEGATE_LOG=warn` turns them off.
pub fn set_access_sink(sink: AccessSink) -> bool {
    ACCESS_SINK.set(sink).is_ok()
}

/// Writes one access line, built by `fill`, if access lines are on and have somewhere to go.
pub fn access(fill: impl FnOnce(&mut AccessLine)) {
    let Some(sink) = ACCESS_SINK.get() else {
        return;
    };
    if !tracing::enabled!(target: "mantlegate::access", tracing::Level::INFO) {
        return;
    }
    thread_local! {
        static BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
    }
    BUF.with(|buf| {
        let Ok(mut buf) = buf.try_borrow_mut() else {
            return;
        };
        buf.clear();
        let mut line = AccessLine(std::mem::take(&mut *buf));
        line.begin();
        fill(&mut line);
        line.end();
        sink(&line.0);
        *buf = line.0;
    });
}

/// One access line being written: `{"timestamp":…,"level":"INFO","message":"access",<fields>,
/// "target":"mantlegate::access"}`, the shape `tracing-subscriber`'s flattened JSON gives the
/// other log lines. Field names are the caller's constants, written as they are; values are
/// JSON-escaped.
pub struct AccessLine(Vec<u8>);

impl AccessLine {
    fn begin(&mut self) {
        self.0.extend_from_slice(br#"{"timestamp":""#);
        write_timestamp(&mut self.0, jiff::Timestamp::now());
        self.0
            .extend_from_slice(br#"","level":"INFO","message":"access""#);
    }

    fn end(&mut self) {
        self.0
            .extend_from_slice(b",\"target\":\"mantlegate::access\"}\n");
    }

    fn key(&mut self, name: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    /// A string field.
    pub fn str(&mut self, name: &str, value: &str) {
        self.key(name);
        // Nearly every value (ids, names, paths, models) needs no escaping: copied as it is.
        // Anything else goes through serde_json's escaper. The check folds over every byte
        // without stopping early, which the compiler turns into a vector loop.
        let to_escape = value.bytes().fold(0_u8, |any, b| {
            any | u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\')
        });
        if to_escape == 0 {
            self.0.reserve(value.len() + 2);
            self.0.push(b'"');
            self.0.extend_from_slice(value.as_bytes());
            self.0.push(b'"');
        } else {
            let _ = serde_json::to_writer(&mut self.0, value);
        }
    }

    /// A string field, left out when `None`.
    pub fn opt_str(&mut self, name: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.str(name, v);
        }
    }

    /// A number or boolean field (anything that serializes as one JSON value).
    pub fn value(&mut self, name: &str, value: impl serde::Serialize) {
        self.key(name);
        let _ = serde_json::to_writer(&mut self.0, &value);
    }

    /// A number field, left out when `None`.
    pub fn opt_value(&mut self, name: &str, value: Option<impl serde::Serialize>) {
        if let Some(v) = value {
            self.value(name, v);
        }
    }
}

thread_local! {
    /// For [`write_timestamp`]: the second last formatted, and its text up to and including
    /// the `.`.
    static TIMESTAMP_SECOND: RefCell<(i64, Vec<u8>)> =
        const { RefCell::new((i64::MIN, Vec::new())) };
}

/// Writes `ts` as RFC 3339 UTC with microseconds (`2026-11-28T12:43:36.123456Z`), the text
/// `format!("{ts:.6}")` gives and tracing-subscriber's other lines have. The date and time up
/// to the second are formatted once per second per thread and reused: through `fmt`, the
/// whole timestamp cost about as much as the rest of the access line.
fn write_timestamp(out: &mut Vec<u8>, ts: jiff::Timestamp) {
    let (second, micros) = (ts.as_second(), ts.subsec_microsecond());
    let Ok(micros) = u32::try_from(micros) else {
        // Before 1970 the sub-second part is negative: not worth a fast path.
        let _ = write!(out, "{ts:.6}");
        return;
    };
    let whole_written = TIMESTAMP_SECOND.with(|cell| {
        let Ok(mut cached) = cell.try_borrow_mut() else {
            // Never busy on one thread's one call path; if it were, the slow path is whole.
            let _ = write!(out, "{ts:.6}");
            return true;
        };
        if cached.0 != second {
            let whole = jiff::Timestamp::from_second(second).unwrap_or(ts);
            cached.1.clear();
            let _ = write!(cached.1, "{whole:.0}");
            // `2026-11-28T12:43:36Z` without its `Z`, then the separator.
            cached.1.pop();
            cached.1.push(b'.');
            cached.0 = second;
        }
        out.extend_from_slice(&cached.1);
        false
    });
    if whole_written {
        return;
    }
    let mut digits = [b'0'; 6];
    let mut rest = micros;
    for d in digits.iter_mut().rev() {
        // A remainder of ten: the cast cannot truncate.
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine(&self.0)
    }
}

impl Write for LogLine<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let Ok(mut pending) = self.0.state.lock() else {
            return Ok(data.len());
        };
        if pending.buf.len() + data.len() > self.0.max_pending {
            pending.dropped += 1;
        } else {
            pending.buf.extend_from_slice(data);
            if pending.buf.len() >= HIGH_WATER {
                self.0.wake.notify_one();
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn flush_loop(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::with_capacity(HIGH_WATER);
    loop {
        let (closed, dropped) = {
            let Ok(mut pending) = shared.state.lock() else {
                return;
            };
            if !pending.closed && pending.buf.len() < HIGH_WATER {
                pending = match shared.wake.wait_timeout(pending, FLUSH_EVERY) {
                    Ok((p, _)) => p,
                    Err(_) => return,
                };
            }
            std::mem::swap(&mut pending.buf, &mut spare);
            (pending.closed, std::mem::take(&mut pending.dropped))
        };
        if !spare.is_empty() {
            let _ = out.write_all(&spare);
            spare.clear();
        }
        if dropped > 0 {
            let _ = writeln!(
                out,
                r#"{{"level":"WARN","message":"log lines dropped: stdout is read too slowly","dropped":{dropped}}}"#
            );
        }
        let _ = out.flush();
        // Give back memory a burst took.
        if spare.capacity() > 4 * HIGH_WATER {
            spare = Vec::with_capacity(HIGH_WATER);
        }
        if closed {
            return;
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.shared.state.lock() {
            pending.closed = true;
        }
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter as _;

    /// An output the test can read while the flusher owns a handle to it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_access_line_is_one_json_object_with_the_tracing_shape() {
        let mut line = AccessLine(Vec::new());
        line.begin();
        line.str("request_id", "mg_1");
        line.str("path", "/v1/chat\"completions\n\u{1}é");
        line.str("model", "modèle\\x");
        line.str("project", "Prodé\u{7f}");
        line.opt_str("route", None);
        line.opt_str("key", Some("k"));
        line.value("stream", true);
        line.value("status", 200u16);
        line.opt_value("upstream_status", None::<u16>);
        line.value("duration_ms", 1.25f64);
        line.end();
        let text = String::from_utf8(line.0).expect("utf8");
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "access");
        assert_eq!(v["target"], "mantlegate::access");
        assert_eq!(v["path"], "/v1/chat\"completions\n\u{1}é");
        assert_eq!(v["model"], "modèle\\x");
        assert_eq!(v["project"], "Prodé\u{7f}");
        assert!(text.contains("\"project\":\"Prodé\u{7f}\""), "{text}");
        assert_eq!(v["key"], "k");
        assert_eq!(v["stream"], true);
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.25);
        assert!(v.get("route").is_none() && v.get("upstream_status").is_none());
        let ts = v["timestamp"].as_str().expect("timestamp");
        let parsed: jiff::Timestamp = ts.parse().expect("RFC 3339");
        let age = jiff::Timestamp::now().duration_since(parsed);
        assert!(age.as_secs() < 60, "{ts}");
        assert!(text.starts_with(r#"{"timestamp":""#), "{text}");
    }

    #[test]
    fn timestamps_are_written_as_jiff_formats_them_across_seconds() {
        // Whole seconds, microsecond edges, a second reused from the cache and one after it,
        // a leap day, and times before 1970 (the slow path).
        let cases = [
            1_795_000_000_000_000_i64,
            1_795_000_000_000_001,
            1_795_000_000_999_999,
            1_795_000_001_000_000,
            1_795_000_001_000_123,
            1_795_000_000_500_000,
            1_709_164_800_042_000,
            0,
            999_999,
            -1,
            -1_000_001,
            253_402_207_199_999_999,
        ];
        for micros in cases {
            let ts = jiff::Timestamp::from_microsecond(micros).expect("in range");
            let mut out = Vec::new();
            write_timestamp(&mut out, ts);
            assert_eq!(
                String::from_utf8(out).expect("utf8"),
                format!("{ts:.6}"),
                "{micros} µs"
            );
        }
    }

    #[test]
    fn a_timestamp_is_whole_even_when_the_cache_is_busy() {
        let ts = jiff::Timestamp::from_microsecond(1_795_000_000_123_456).expect("in range");
        let mut out = Vec::new();
        TIMESTAMP_SECOND.with(|cell| {
            let _held = cell.borrow_mut();
            write_timestamp(&mut out, ts);
        });
        assert_eq!(String::from_utf8(out).expect("utf8"), format!("{ts:.6}"));
    }

    #[test]
    fn values_that_need_escaping_are_escaped_wherever_the_byte_is() {
        // The check folds over every byte: a byte to escape at any position of a longer
        // value (past a vector's width) must still be found.
        for len in [1_usize, 15, 16, 17, 31, 32, 33, 64, 100] {
            for at in 0..len {
                for bad in ['"', '\\', '\n', '\u{1}'] {
                    let mut value: Vec<char> = vec!['a'; len];
                    value[at] = bad;
                    let value: String = value.into_iter().collect();
                    let mut line = AccessLine(Vec::new());
                    line.str("k", &value);
                    let text = String::from_utf8(line.0).expect("utf8");
                    let json = format!("{{{}}}", &text[1..]);
                    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
                    assert_eq!(v["k"], value.as_str(), "{len} {at} {bad:?}");
                }
            }
        }
    }

    #[test]
    fn every_line_comes_out_in_order_by_the_time_the_guard_is_dropped() {
        let sink = Sink::default();
        let (writer, guard) = batched(sink.clone()).expect("start");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        writer
                            .make_writer()
                            .write_all(format!("{t} {i}\n").as_bytes())
                            .expect("write");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().expect("lock").clone()).expect("utf8");
        assert_eq!(text.lines().count(), 4000);
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .map(|n| n.parse().expect("number"))
                .collect();
            assert_eq!(
                mine,
                (0..1000).collect::<Vec<_>>(),
                "thread {t}'s lines in order"
            );
        }
    }

    #[test]
    fn past_the_limit_lines_are_dropped_and_the_drop_is_logged() {
        /// An output that blocks until the test lets it go, as a stalled log reader does.
        struct Stalled(Arc<(Mutex<bool>, Condvar)>, Sink);
        impl Write for Stalled {
            fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
                let (open, cv) = &*self.0;
                let mut open = open.lock().expect("lock");
                while !*open {
                    open = cv.wait(open).expect("wait");
                }
                self.1.write(data)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let (writer, guard) =
            batched_with(Stalled(gate.clone(), sink.clone()), 100).expect("start");
        for i in 0..100 {
            writer
                .make_writer()
                .write_all(format!("line {i:04}\n").as_bytes())
                .expect("write");
        }
        *gate.0.lock().expect("lock") = true;
        gate.1.notify_all();
        drop(guard);
        let text = String::from_utf8(sink.0.lock().expect("lock").clone()).expect("utf8");
        let kept = text.lines().filter(|l| l.starts_with("line ")).count();
        assert!(kept < 100, "{kept} lines kept past a 100-byte limit");
        let dropped: u64 = text
            .lines()
            .filter(|l| l.contains("log lines dropped"))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json");
                v["dropped"].as_u64().expect("count")
            })
            .sum();
        assert_eq!(dropped, 100 - kept as u64, "every dropped line is counted");
    }
}
