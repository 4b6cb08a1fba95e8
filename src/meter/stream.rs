//! The meter of one response body: watches frames as they are relayed, strips the usage chunk
//! mantlegate asked for on the client's behalf, and says at the end what the call used.

use std::collections::VecDeque;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;

use super::sse::SseScanner;
use super::usage::{self, ChatChunk, ResponsesEvent};
use super::{Usage, UsageSource};

/// Largest non-streamed body kept (as shared references to the relayed chunks) for reading its
/// usage at the end; bigger ones are relayed without it and recorded as `missing`.
const MAX_JSON_BODY: usize = 64 * 1024 * 1024;

/// Bytes of a gathering block (see [`BodyMeter::push_out`]): about ten stream events.
const ARENA_BYTES: usize = 2048;

/// Pieces up to this size are gathered, copied, into one frame with the pieces queued with
/// them. hyper's cost is per frame (the chunk-size line it formats, its write queue, three
/// iovecs), about a thousand instructions; copying a few hundred bytes costs a few dozen.
const GATHER_MAX: usize = 4096;

/// What to cut from a relayed event.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// It has no `"usage":null`.
    Nothing,
    /// The bytes `(at, len)` of the chunk.
    At(usize, usize),
    /// Not known from the classifier: search the event.
    Search,
}

/// What kind of answer is being metered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Nothing to meter (model lists, deletes, errors...).
    None,
    /// A `chat.completion` JSON body.
    ChatJson,
    /// A Responses `response` JSON body (create, or a GET of a stored response).
    ResponseJson,
    /// A chat completion SSE stream.
    ChatStream {
        /// mantlegate injected `include_usage`: remove the usage-only chunk from the relay.
        strip_usage: bool,
    },
    /// A Responses SSE stream.
    ResponsesStream,
}

/// The result of metering a body.
#[derive(Debug, Clone, Default)]
pub struct Metered {
    /// Token counts (reported or estimated).
    pub usage: Usage,
    /// Where they came from; `None` when the call has no usage.
    pub source: Option<UsageSource>,
    /// The Responses object id, when seen.
    pub response_id: Option<String>,
    /// The Responses object status, when seen (`queued`, `completed`, ...).
    pub response_status: Option<String>,
    /// Whether the Responses object runs in the background.
    pub background: bool,
}

/// Incremental meter; see the module docs.
pub struct BodyMeter {
    kind: Kind,
    scanner: SseScanner,
    /// Non-streamed body chunks (shared, not copied) until the end.
    json: Vec<Bytes>,
    json_len: usize,
    /// Stream state.
    usage: Option<Usage>,
    content_events: u64,
    response_id: Option<String>,
    response_status: Option<String>,
    /// Event-aligned relay (only when stripping): bytes of an event not yet complete.
    carry: BytesMut,
    out: VecDeque<Bytes>,
    /// Total length of `out`.
    out_bytes: usize,
    /// Event-aligned relay: the last event relayed (`Some(false)`) or cut (`Some(true)`) ended
    /// its chunk with the `\r` of its blank line, so a `\n` opening the next chunk is its own.
    cr_ended: Option<bool>,
    /// Event-aligned relay: where each event of the current chunk ends, whether it is dropped,
    /// and what of it to cut (kept between chunks so that relaying a chunk allocates nothing).
    cuts: Vec<(usize, bool, Cut)>,
    /// Where small pieces queued together are gathered, and events with `"usage":null` cut
    /// out are written: it comes after everything in `out`, and leaves as one frame (a shared
    /// slice of one allocation that serves many).
    arena: BytesMut,
    /// Estimated input tokens, from the request body's size.
    input_estimate: u64,
    /// The stream's own end was seen (`[DONE]`, or a Responses terminal event).
    ended: bool,
}

impl BodyMeter {
    /// A meter for `kind`; `request_bytes` sizes the input estimate used when no usage comes.
    #[must_use]
    pub fn new(kind: Kind, request_bytes: usize) -> Self {
        Self {
            kind,
            scanner: SseScanner::new(),
            json: Vec::new(),
            json_len: 0,
            usage: None,
            content_events: 0,
            response_id: None,
            response_status: None,
            carry: BytesMut::new(),
            out: VecDeque::new(),
            out_bytes: 0,
            cr_ended: None,
            cuts: Vec::new(),
            arena: BytesMut::new(),
            // About four bytes per token, the usual rule of thumb for English text and JSON.
            input_estimate: (request_bytes / 4) as u64,
            ended: false,
        }
    }

    /// Whether the stream's own end (`[DONE]`, a Responses terminal event) has been relayed:
    /// a client that hangs up after it has had the whole answer.
    #[must_use]
    pub fn saw_end(&self) -> bool {
        self.ended
    }

    /// A meter of nothing, for a relay whose meter has been handed on.
    #[must_use]
    pub fn idle() -> Self {
        Self::new(Kind::None, 0)
    }

    /// Whether the usage comes at the end of the body (a non-streamed JSON answer): a client
    /// that leaves early leaves it unread.
    #[must_use]
    pub fn usage_at_end(&self) -> bool {
        matches!(self.kind, Kind::ChatJson | Kind::ResponseJson)
    }

    /// Whether frames must go through [`BodyMeter::relay`] (they may be cut or held).
    #[must_use]
    pub fn rewrites(&self) -> bool {
        matches!(self.kind, Kind::ChatStream { strip_usage: true })
    }

    /// Observes a frame relayed unchanged.
    pub fn observe(&mut self, chunk: &Bytes) {
        match self.kind {
            Kind::None => {}
            Kind::ChatJson | Kind::ResponseJson => {
                self.json_len += chunk.len();
                if self.json_len <= MAX_JSON_BODY {
                    self.json.push(chunk.clone());
                } else {
                    self.json.clear();
                }
            }
            Kind::ChatStream { .. } => {
                let (usage, content, ended) =
                    (&mut self.usage, &mut self.content_events, &mut self.ended);
                self.scanner.feed(chunk, |ev| {
                    chat_event(ev.data, usage, content, ended);
                });
            }
            Kind::ResponsesStream => {
                let (usage, content, id, status, ended) = (
                    &mut self.usage,
                    &mut self.content_events,
                    &mut self.response_id,
                    &mut self.response_status,
                    &mut self.ended,
                );
                self.scanner.feed(chunk, |ev| {
                    responses_event(ev.event, ev.data, usage, content, id, status, ended);
                });
            }
        }
    }

    /// End of an observed (not rewritten) stream: a last event whose blank line never came
    /// still counts (an upstream may end the body right after its terminal event).
    pub fn finish_observe(&mut self) {
        match self.kind {
            Kind::ChatStream { .. } => {
                let (usage, content, ended) =
                    (&mut self.usage, &mut self.content_events, &mut self.ended);
                self.scanner.finish(|ev| {
                    chat_event(ev.data, usage, content, ended);
                });
            }
            Kind::ResponsesStream => {
                let (usage, content, id, status, ended) = (
                    &mut self.usage,
                    &mut self.content_events,
                    &mut self.response_id,
                    &mut self.response_status,
                    &mut self.ended,
                );
                self.scanner.finish(|ev| {
                    responses_event(ev.event, ev.data, usage, content, id, status, ended);
                });
            }
            Kind::None | Kind::ChatJson | Kind::ResponseJson => {}
        }
    }

    /// Takes a frame and queues what the client should get of it (event-aligned, with the
    /// injected usage chunk removed). Read the result with [`BodyMeter::next_out`].
    pub fn relay(&mut self, chunk: &Bytes) {
        if chunk.is_empty() {
            // Nothing to cut, and a `\r` ending the last chunk still waits for its `\n`.
            return;
        }
        let mut cuts = std::mem::take(&mut self.cuts);
        cuts.clear();
        let (usage, content, ended) = (&mut self.usage, &mut self.content_events, &mut self.ended);
        let base = chunk.as_ptr() as usize;
        self.scanner.feed(chunk, |ev| {
            let (class, null_usage) = usage::chat_chunk_and_null_usage(ev.data);
            let drop = apply_chat(class, usage, content, ended);
            // Where the event's data is a slice of this chunk (one `data:` line read whole), the
            // classifier's search said where `"usage":null` is, or that there is none. Data
            // gathered from several lines or chunks is searched again when relayed.
            let at = (ev.data.as_ptr() as usize).wrapping_sub(base);
            let cut = if at <= chunk.len() && ev.data.len() <= chunk.len() - at {
                null_usage.map_or(Cut::Nothing, |(start, len)| Cut::At(at + start, len))
            } else {
                Cut::Search
            };
            cuts.push((ev.end, drop, cut));
        });
        let mut start = 0;
        // The `\n` of a `\r\n` split between chunks goes with the event its `\r` ended, as it
        // does when the upstream sends both in one chunk, not with the next (which may be cut).
        if let Some(dropped) = self.cr_ended.take()
            && chunk.first() == Some(&b'\n')
        {
            if !dropped {
                self.push_out(chunk.slice(..1));
            }
            start = 1;
        }
        if let Some(&(end, dropped, _)) = cuts.last()
            && end == chunk.len()
            && chunk.last() == Some(&b'\r')
        {
            self.cr_ended = Some(dropped);
        }
        for &(end, drop, cut) in &cuts {
            let piece = chunk.slice(start..end);
            if drop {
                self.carry.clear();
            } else if self.carry.is_empty() {
                match cut {
                    Cut::Nothing => self.push_out(piece),
                    Cut::At(at, len) if at >= start && at + len <= end => {
                        self.cut_out(&piece, at - start, len);
                    }
                    Cut::At(..) | Cut::Search => self.push_out(without_null_usage(piece)),
                }
            } else {
                self.carry.extend_from_slice(&piece);
                let joined = without_null_usage(self.carry.split().freeze());
                self.push_out(joined);
            }
            start = end;
        }
        self.cuts = cuts;
        if start < chunk.len() {
            self.carry.extend_from_slice(&chunk[start..]);
        }
    }

    /// Queues `piece` without the `len` bytes at `at`, written into the arena.
    fn cut_out(&mut self, piece: &[u8], at: usize, len: usize) {
        let need = piece.len() - len;
        self.out_bytes += need;
        self.gather(need);
        self.arena.extend_from_slice(&piece[..at]);
        self.arena.extend_from_slice(&piece[at + len..]);
    }

    /// Readies the arena to take `need` more bytes after everything queued: a small piece
    /// queued last moves into it, so that they leave together.
    fn gather(&mut self, need: usize) {
        let last = match self.out.back() {
            Some(last) if self.arena.is_empty() && last.len() <= GATHER_MAX => last.len(),
            _ => 0,
        };
        if self.arena.capacity() - self.arena.len() < last + need {
            // A full block leaves as a frame of its own: nothing gathered is copied twice.
            if !self.arena.is_empty() {
                self.out.push_back(self.arena.split().freeze());
            }
            self.arena = BytesMut::with_capacity((last + need).max(ARENA_BYTES));
        }
        if last > 0
            && let Some(piece) = self.out.pop_back()
        {
            self.arena.extend_from_slice(&piece);
        }
    }

    /// Whether pieces wait to be handed to the client.
    #[must_use]
    pub fn has_out(&self) -> bool {
        !self.out.is_empty() || !self.arena.is_empty()
    }

    /// Bytes of the pieces waiting to be handed to the client.
    #[must_use]
    pub fn out_bytes(&self) -> usize {
        self.out_bytes
    }

    /// Queues a piece for the client after those already queued. Pieces queued together leave
    /// together: small ones are gathered (copied) into one frame, larger ones pass as they are.
    pub fn push_out(&mut self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        self.out_bytes += piece.len();
        let gathering =
            !self.arena.is_empty() || self.out.back().is_some_and(|last| last.len() <= GATHER_MAX);
        if piece.len() <= GATHER_MAX && gathering {
            self.gather(piece.len());
            self.arena.extend_from_slice(&piece);
            return;
        }
        if !self.arena.is_empty() {
            self.out.push_back(self.arena.split().freeze());
        }
        self.out.push_back(piece);
    }

    /// The next piece queued by [`BodyMeter::relay`].
    pub fn next_out(&mut self) -> Option<Bytes> {
        let piece = match self.out.pop_front() {
            Some(piece) => piece,
            None if !self.arena.is_empty() => self.arena.split().freeze(),
            None => return None,
        };
        self.out_bytes -= piece.len();
        Some(piece)
    }

    /// End of the upstream body: bytes still held (a last event without its blank line).
    pub fn finish_relay(&mut self) -> Option<Bytes> {
        let (usage, content, ended) = (&mut self.usage, &mut self.content_events, &mut self.ended);
        let mut dropped = false;
        self.scanner.finish(|ev| {
            dropped = chat_event(ev.data, usage, content, ended);
        });
        if dropped || self.carry.is_empty() {
            self.carry.clear();
            None
        } else {
            Some(self.carry.split().freeze())
        }
    }

    /// What the call used, as far as the body showed. `complete` says whether the body ended
    /// normally (else the client left or the upstream broke off).
    #[must_use]
    pub fn result(&mut self, success: bool, complete: bool) -> Metered {
        let mut m = Metered::default();
        match self.kind {
            Kind::None => {}
            Kind::ChatJson | Kind::ResponseJson => {
                if !success {
                    return m;
                }
                let body = self.joined();
                if self.kind == Kind::ChatJson {
                    if let Some(u) = usage::chat_usage(&body) {
                        m.usage = u;
                        m.source = Some(UsageSource::Reported);
                    } else {
                        m.source = Some(self.estimate_source(&mut m.usage, complete));
                    }
                } else if let Some(obj) = usage::response_object(&body) {
                    m.response_id = Some(obj.id);
                    m.background = obj.background;
                    m.usage = obj.usage.unwrap_or_default();
                    m.source = Some(if obj.usage.is_some() {
                        UsageSource::Reported
                    } else if usage::is_terminal(&obj.status) {
                        UsageSource::Missing
                    } else {
                        UsageSource::None
                    });
                    m.response_status = Some(obj.status);
                } else {
                    m.source = Some(self.estimate_source(&mut m.usage, complete));
                }
            }
            Kind::ChatStream { .. } | Kind::ResponsesStream => {
                if !success {
                    return m;
                }
                m.response_id = self.response_id.take();
                m.response_status = self.response_status.take();
                if let Some(u) = self.usage {
                    m.usage = u;
                    m.source = Some(UsageSource::Reported);
                } else {
                    m.source = Some(self.estimate_source(&mut m.usage, complete));
                }
            }
        }
        m
    }

    /// No reported usage: estimate input from the request size and output from the content
    /// events relayed (streams send about one token per event).
    fn estimate_source(&self, usage: &mut Usage, _complete: bool) -> UsageSource {
        if self.content_events == 0 && self.input_estimate == 0 {
            return UsageSource::Missing;
        }
        *usage = Usage {
            input: self.input_estimate,
            cached_input: 0,
            output: self.content_events,
            reasoning: 0,
        };
        UsageSource::Estimated
    }

    fn joined(&mut self) -> Bytes {
        match self.json.len() {
            0 => Bytes::new(),
            1 => self.json[0].clone(),
            _ => {
                let mut all = BytesMut::with_capacity(self.json_len);
                for c in &self.json {
                    all.extend_from_slice(c);
                }
                all.freeze()
            }
        }
    }
}

/// Applies one Responses stream event to the meter.
fn responses_event(
    event: Option<&str>,
    data: &[u8],
    usage: &mut Option<Usage>,
    content: &mut u64,
    id: &mut Option<String>,
    status: &mut Option<String>,
    ended: &mut bool,
) {
    match usage::responses_event(event, data) {
        ResponsesEvent::Created { id: created } => *id = Some(created),
        ResponsesEvent::Terminal {
            id: terminal_id,
            status: s,
            usage: u,
        } => {
            if id.is_none() {
                *id = terminal_id;
            }
            *status = Some(s);
            *ended = true;
            if u.is_some() {
                *usage = u;
            }
        }
        ResponsesEvent::Delta => *content += 1,
        ResponsesEvent::Error | ResponsesEvent::Other => {}
    }
}

/// Removes the `"usage":null` member that `include_usage` adds to every chunk, so a client
/// that did not ask for usage gets chunks as it would have without it. Only that exact
/// member is cut: inside a JSON string the quotes would be escaped, so it cannot match text.
fn without_null_usage(piece: Bytes) -> Bytes {
    // Searchers built once: `memmem::find` builds one per call, and this runs per chunk.
    static WITH_COMMA_BEFORE: LazyLock<Finder<'static>> =
        LazyLock::new(|| Finder::new(b",\"usage\":null"));
    static WITH_COMMA_AFTER: LazyLock<Finder<'static>> =
        LazyLock::new(|| Finder::new(b"\"usage\":null,"));
    let (at, len) = if let Some(i) = WITH_COMMA_BEFORE.find(&piece) {
        (i, WITH_COMMA_BEFORE.needle().len())
    } else if let Some(i) = WITH_COMMA_AFTER.find(&piece) {
        (i, WITH_COMMA_AFTER.needle().len())
    } else {
        return piece;
    };
    let mut out = BytesMut::with_capacity(piece.len() - len);
    out.extend_from_slice(&piece[..at]);
    out.extend_from_slice(&piece[at + len..]);
    out.freeze()
}

/// Applies one chat stream event to the meter; returns whether it is the usage-only chunk.
fn chat_event(data: &[u8], usage: &mut Option<Usage>, content: &mut u64, ended: &mut bool) -> bool {
    apply_chat(usage::chat_chunk(data), usage, content, ended)
}

/// Applies a classified chat stream event to the meter; returns whether it is the usage-only
/// chunk.
fn apply_chat(
    class: ChatChunk,
    usage: &mut Option<Usage>,
    content: &mut u64,
    ended: &mut bool,
) -> bool {
    match class {
        ChatChunk::Usage {
            usage: u,
            usage_only,
        } => {
            *usage = Some(u);
            if !usage_only {
                *content += 1;
            }
            usage_only
        }
        ChatChunk::Content => {
            *content += 1;
            false
        }
        ChatChunk::Done => {
            *ended = true;
            false
        }
        ChatChunk::Error | ChatChunk::Other => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_USAGE: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi \\\"usage\\\":null\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
data: [DONE]\n\n";

    const WITHOUT_USAGE: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi \\\"usage\\\":null\"}}]}\n\n\
data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: [DONE]\n\n";

    fn relay_all(chunks: &[&[u8]]) -> (Vec<u8>, Metered) {
        let mut m = BodyMeter::new(Kind::ChatStream { strip_usage: true }, 40);
        let mut out = Vec::new();
        for c in chunks {
            m.relay(&Bytes::copy_from_slice(c));
            while let Some(p) = m.next_out() {
                out.extend_from_slice(&p);
            }
        }
        if let Some(rest) = m.finish_relay() {
            out.extend_from_slice(&rest);
        }
        assert!(m.saw_end());
        (out, m.result(true, true))
    }

    #[test]
    fn injected_usage_is_removed_at_any_split() {
        let bytes = WITH_USAGE.as_bytes();
        for cut in 0..bytes.len() {
            let (out, metered) = relay_all(&[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(String::from_utf8_lossy(&out), WITHOUT_USAGE, "cut at {cut}");
            assert_eq!(metered.usage.input, 5);
            assert_eq!(metered.usage.output, 2);
            assert_eq!(metered.source, Some(UsageSource::Reported));
        }
    }

    #[test]
    fn injected_usage_is_removed_from_a_crlf_stream_at_any_split() {
        let with = WITH_USAGE.replace('\n', "\r\n");
        let without = WITHOUT_USAGE.replace('\n', "\r\n");
        let bytes = with.as_bytes();
        for cut in 0..bytes.len() {
            for second in cut..bytes.len() {
                let (out, metered) =
                    relay_all(&[&bytes[..cut], &bytes[cut..second], &bytes[second..]]);
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    without,
                    "cut at {cut} and {second}"
                );
                assert_eq!(metered.source, Some(UsageSource::Reported));
            }
        }
    }

    fn drain(m: &mut BodyMeter) -> Vec<Bytes> {
        let mut frames = Vec::new();
        while let Some(p) = m.next_out() {
            frames.push(p);
        }
        assert_eq!(m.out_bytes(), 0);
        assert!(!m.has_out());
        frames
    }

    #[test]
    fn pieces_queued_together_leave_as_one_frame_and_a_lone_one_is_not_copied() {
        let mut m = BodyMeter::new(Kind::ResponsesStream, 0);
        let lone = Bytes::from_static(b"data: 1\n\n");
        m.push_out(lone.clone());
        let frames = drain(&mut m);
        assert_eq!(frames, std::slice::from_ref(&lone));
        assert_eq!(frames[0].as_ptr(), lone.as_ptr(), "relayed as it came");

        let big = Bytes::from(vec![b'x'; GATHER_MAX + 1]);
        let pieces = [
            Bytes::from_static(b"a"),
            Bytes::from_static(b"bc"),
            Bytes::new(),
            big.clone(),
            Bytes::from_static(b"d"),
            Bytes::from_static(b"ef"),
        ];
        for p in &pieces {
            m.push_out(p.clone());
        }
        assert_eq!(m.out_bytes(), pieces.iter().map(Bytes::len).sum::<usize>());
        let frames = drain(&mut m);
        assert_eq!(
            frames,
            [
                Bytes::from_static(b"abc"),
                big.clone(),
                Bytes::from_static(b"def")
            ]
        );
        assert_eq!(
            frames[1].as_ptr(),
            big.as_ptr(),
            "a large piece is not copied"
        );
        assert_eq!(m.next_out(), None);

        // More than a block: full blocks leave as frames of their own, nothing is lost.
        let pieces: Vec<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i; 100])).collect();
        for p in &pieces {
            m.push_out(p.clone());
        }
        let frames = drain(&mut m);
        assert_eq!(frames.concat(), pieces.concat());
        assert!(
            frames.len() > 1 && frames.len() <= 100 * 100 / ARENA_BYTES + 1,
            "{}",
            frames.len()
        );
    }

    #[test]
    fn the_events_of_one_chunk_leave_stripped_as_one_frame() {
        let mut m = BodyMeter::new(Kind::ChatStream { strip_usage: true }, 40);
        m.relay(&Bytes::from_static(WITH_USAGE.as_bytes()));
        assert_eq!(
            drain(&mut m),
            [Bytes::from_static(WITHOUT_USAGE.as_bytes())]
        );
        // Over many chunks, blocks fill and are replaced; what was handed out stays whole.
        let mut handed_out = Vec::new();
        for _ in 0..200 {
            m.relay(&Bytes::from_static(WITH_USAGE.as_bytes()));
            let frames = drain(&mut m);
            assert!(frames.len() <= 2, "{} frames", frames.len());
            handed_out.push(frames);
        }
        for frames in handed_out {
            assert_eq!(frames.concat(), WITHOUT_USAGE.as_bytes());
        }
    }

    #[test]
    fn a_stream_cut_short_is_estimated() {
        let bytes = WITH_USAGE.as_bytes();
        let first_event_end = WITH_USAGE.find("\n\n").expect("event") + 2;
        let mut m = BodyMeter::new(Kind::ChatStream { strip_usage: true }, 400);
        m.relay(&Bytes::copy_from_slice(&bytes[..first_event_end]));
        assert!(!m.saw_end());
        let metered = m.result(true, false);
        assert_eq!(metered.source, Some(UsageSource::Estimated));
        assert_eq!(metered.usage.output, 1);
        assert_eq!(metered.usage.input, 100);
    }
}
