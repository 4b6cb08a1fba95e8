//! Log output: JSON lines on stdout, written in batches by a background thread.
//!
//! Hand-written rather than `tracing_appender::non_blocking`, which wakes its writer thread
//! for every line: on a proxy pinned to a core or two, each call's access line then cost two
//! context switches and a `write` syscall. Here a line is copied into a shared buffer under a
//! short lock, and a flusher thread writes the buffer out every [`FLUSH_EVERY`] (sooner once
//! [`HIGH_WATER`] bytes wait), one `write` for many lines. If the reader of stdout falls
//! [`MAX_PENDING`] bytes behind, lines are dropped rather than blocking calls (the ledger, not
//! the log, is the record of calls), and the drop is itself logged.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
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
