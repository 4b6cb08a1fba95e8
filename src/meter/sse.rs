//! Incremental Server-Sent Events scanner: finds the events in relayed bytes, chunk by chunk.

use memchr::memchr2;

/// Data larger than this in one event makes the scanner drop that event: it is skipped up to
/// the blank line that would have dispatched it, and never dispatched. This bounds the memory
/// one stream can make the scanner hold (about twice this, for a line carried across chunks
/// plus the data buffer) whatever the upstream sends.
pub const MAX_EVENT_DATA: usize = 16 * 1024 * 1024;

/// The longest carried line kept: a `data: ` line whose value is exactly [`MAX_EVENT_DATA`].
const MAX_LINE: usize = MAX_EVENT_DATA + 6;

/// Buffers that grew past this for one big event are shrunk back to [`KEEP_CAPACITY`] after it,
/// so a single large event does not pin megabytes for the rest of a long stream.
const SHRINK_ABOVE: usize = 1024 * 1024;
const KEEP_CAPACITY: usize = 64 * 1024;

/// The UTF-8 byte order mark, which may open a stream and is then ignored.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched SSE event. `data` is the event's data lines joined by '\n' (no trailing '\n').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field; `None` when absent, empty, or not valid UTF-8.
    pub event: Option<&'a str>,
    /// The `data:` lines' values joined by `\n`.
    pub data: &'a [u8],
    /// Offset in the chunk given to [`SseScanner::feed`] just past the terminator of the blank
    /// line that dispatched this event; 0 for an event dispatched by [`SseScanner::finish`].
    /// When that blank line ended in a `\r` that was the chunk's last byte, `end` is the chunk's
    /// length, and a `\n` opening the next chunk is skipped as the rest of that terminator.
    pub end: usize,
}

/// An incremental SSE parser (WHATWG rules) that never re-scans bytes it has seen: feed it
/// every chunk of a stream in order, then call [`finish`](Self::finish) at the end.
///
/// Lines end in `\r\n`, `\n` or `\r`, split anywhere between chunks. Comments (`:` lines) and
/// the `id` and `retry` fields are ignored. An event whose data is a single line inside the
/// current chunk is passed as a slice of that chunk; otherwise the data is gathered in an
/// internal buffer that is reused from event to event. An event with more than
/// [`MAX_EVENT_DATA`] bytes of data is dropped.
#[derive(Debug, Default)]
pub struct SseScanner {
    /// The start of a line whose terminator has not come yet.
    line: Vec<u8>,
    /// The current line was too long to carry and is being skipped up to its terminator.
    skipping_line: bool,
    /// The last chunk ended in a `\r` terminator; a `\n` opening the next one belongs to it.
    after_cr: bool,
    /// A first line was seen (a byte order mark is only stripped from the first).
    started: bool,
    /// Bytes fed since the last blank line.
    pending: usize,
    event: EventBuf,
}

impl SseScanner {
    /// A scanner at the start of a stream.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans the next chunk of the stream, calling `on_event` for each event it completes, in
    /// order. The event borrows the chunk or the scanner, so copy out what must outlive the call.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        let Some(&first) = chunk.first() else {
            return;
        };
        let mut pos = 0;
        // Offset just past the last blank line in this chunk.
        let mut boundary = None;
        if std::mem::take(&mut self.after_cr) && first == b'\n' {
            pos = 1;
            if self.pending == 0 {
                // The `\r` ended a blank line: this `\n` is still part of that boundary.
                boundary = Some(1);
            }
        }
        while let Some(rest) = chunk.get(pos..).filter(|rest| !rest.is_empty()) {
            let Some(found) = memchr2(b'\n', b'\r', rest) else {
                self.carry(rest);
                break;
            };
            let term = pos + found;
            // The usual event, `data: ...` and its blank line whole in this chunk, after nothing
            // but an `event:` line: dispatched straight from the chunk, without the line-by-line
            // bookkeeping below (which gives the same result, more slowly).
            if chunk[term] == b'\n'
                && chunk.get(term + 1) == Some(&b'\n')
                && self.started
                && self.line.is_empty()
                && !self.skipping_line
                && let Some(value_at) = data_value_at(&rest[..found])
                && self.event.takes_one_line(found - value_at)
            {
                let next = term + 2;
                self.event
                    .dispatch_line(&chunk[pos + value_at..term], next, &mut on_event);
                boundary = Some(next);
                pos = next;
                continue;
            }
            let next = if chunk[term] == b'\r' {
                match chunk.get(term + 1) {
                    Some(b'\n') => term + 2,
                    Some(_) => term + 1,
                    None => {
                        self.after_cr = true;
                        term + 1
                    }
                }
            } else {
                term + 1
            };
            if self.end_line(chunk, pos, term) {
                self.event.dispatch(chunk, next, &mut on_event);
                boundary = Some(next);
            }
            pos = next;
        }
        // Data still pointing into the chunk must be copied before the chunk goes away.
        self.event.detach(chunk);
        self.pending = match boundary {
            Some(at) => chunk.len() - at,
            None => self.pending + chunk.len(),
        };
    }

    /// End of stream: dispatches a final event whose blank line never came (if it has data).
    ///
    /// Unlike a browser, which discards such an event, this treats an unterminated last line as
    /// a complete line, so a stream cut right after `data: [DONE]` or after the terminal event
    /// still meters. The scanner is then back at the start of a (new) stream.
    pub fn finish(&mut self, mut on_event: impl FnMut(SseEvent<'_>)) {
        if !self.skipping_line && !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.event.line(strip_bom(&line, !self.started), None, &[]);
            self.line = line;
        }
        self.event.dispatch(&[], 0, &mut on_event);
        self.line.clear();
        shrink(&mut self.line);
        self.skipping_line = false;
        self.after_cr = false;
        self.started = false;
        self.pending = 0;
    }

    /// Bytes fed so far that belong to an event not yet dispatched (0 when at an event boundary).
    ///
    /// Every blank line is a boundary, including one that dispatches nothing (after a comment,
    /// an event without data, or a dropped oversized event). So the last `pending_len()` bytes
    /// fed are the start of the next event.
    #[must_use]
    pub fn pending_len(&self) -> usize {
        self.pending
    }

    /// Keeps the start of a line that goes on in the next chunk.
    fn carry(&mut self, part: &[u8]) {
        if self.skipping_line {
            return;
        }
        if self.line.len() + part.len() > MAX_LINE {
            self.overflow(part);
        } else {
            self.line.extend_from_slice(part);
        }
    }

    /// A line too long to carry: skip it, and drop its event if it was data or the event type.
    fn overflow(&mut self, part: &[u8]) {
        let mut head = [0u8; 6];
        for (slot, &byte) in head.iter_mut().zip(self.line.iter().chain(part)) {
            *slot = byte;
        }
        if head.starts_with(b"data:") || head == *b"event:" {
            self.event.drop_data();
        }
        self.line.clear();
        shrink(&mut self.line);
        self.skipping_line = true;
    }

    /// Handles the line `chunk[start..term]` (plus any carried start); true when it was blank.
    fn end_line(&mut self, chunk: &[u8], start: usize, term: usize) -> bool {
        let part = &chunk[start..term];
        if self.skipping_line {
            self.skipping_line = false;
            return false;
        }
        let first = !self.started;
        self.started = true;
        if self.line.is_empty() {
            let line = strip_bom(part, first);
            let at = start + (part.len() - line.len());
            return self.event.line(line, Some(at), chunk);
        }
        if self.line.len() + part.len() > MAX_LINE {
            self.overflow(part);
            self.skipping_line = false;
            return false;
        }
        self.line.extend_from_slice(part);
        let mut line = std::mem::take(&mut self.line);
        let blank = self.event.line(strip_bom(&line, first), None, chunk);
        line.clear();
        shrink(&mut line);
        self.line = line;
        blank
    }
}

/// The event being gathered.
#[derive(Debug, Default)]
struct EventBuf {
    /// The data, when [`Data::Buffered`].
    data: Vec<u8>,
    state: Data,
    /// The last `event:` value (empty: none).
    kind: Vec<u8>,
}

/// Where the current event's data is.
#[derive(Debug, Default, Clone, Copy)]
enum Data {
    /// No data line yet.
    #[default]
    None,
    /// One data line, at this range of the current chunk.
    InChunk { start: usize, end: usize },
    /// In [`EventBuf::data`].
    Buffered,
    /// Too much data: the event is skipped up to its blank line.
    Dropped,
}

impl EventBuf {
    /// Handles one complete line (terminator excluded). `at` is its offset in `chunk` when it
    /// lies there whole, `None` when it was carried. Returns true for a blank line.
    fn line(&mut self, line: &[u8], at: Option<usize>, chunk: &[u8]) -> bool {
        let Some(&first) = line.first() else {
            return true;
        };
        if first == b':' {
            return false;
        }
        let (name, value_at) = match memchr::memchr(b':', line) {
            Some(colon) if line.get(colon + 1) == Some(&b' ') => (&line[..colon], colon + 2),
            Some(colon) => (&line[..colon], colon + 1),
            None => (line, line.len()),
        };
        let value = &line[value_at..];
        match name {
            b"data" => self.push_data(value, at.map(|at| at + value_at), chunk),
            b"event" => {
                self.kind.clear();
                self.kind.extend_from_slice(value);
            }
            _ => {}
        }
        false
    }

    /// Appends a data value; `at` is its offset in `chunk` when it lies there.
    fn push_data(&mut self, value: &[u8], at: Option<usize>, chunk: &[u8]) {
        match (self.state, at) {
            (Data::Dropped, _) => {}
            (Data::None, _) if value.len() > MAX_EVENT_DATA => self.drop_data(),
            (Data::None, Some(start)) => {
                self.state = Data::InChunk {
                    start,
                    end: start + value.len(),
                };
            }
            (Data::None, None) => {
                self.data.clear();
                self.data.extend_from_slice(value);
                self.state = Data::Buffered;
            }
            (Data::InChunk { start, end }, _) => {
                if end - start + 1 + value.len() > MAX_EVENT_DATA {
                    self.drop_data();
                } else {
                    self.data.clear();
                    self.data.extend_from_slice(&chunk[start..end]);
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                    self.state = Data::Buffered;
                }
            }
            (Data::Buffered, _) => {
                if self.data.len() + 1 + value.len() > MAX_EVENT_DATA {
                    self.drop_data();
                } else {
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                }
            }
        }
    }

    /// Forgets the data gathered so far; the event will not be dispatched, and data lines that
    /// follow, up to the blank line, are ignored.
    fn drop_data(&mut self) {
        self.data.clear();
        shrink(&mut self.data);
        self.state = Data::Dropped;
    }

    /// Moves data that points into `chunk` into the buffer.
    fn detach(&mut self, chunk: &[u8]) {
        if let Data::InChunk { start, end } = self.state {
            self.data.clear();
            self.data.extend_from_slice(&chunk[start..end]);
            self.state = Data::Buffered;
        }
    }

    /// Whether a data line of `len` bytes, followed by a blank line, would be the whole data of
    /// the event (no data before it, none dropped) and be dispatched.
    fn takes_one_line(&self, len: usize) -> bool {
        matches!(self.state, Data::None) && len <= MAX_EVENT_DATA
    }

    /// Dispatches an event whose data is this one line (see [`EventBuf::takes_one_line`]).
    fn dispatch_line(&mut self, data: &[u8], end: usize, on_event: &mut impl FnMut(SseEvent<'_>)) {
        on_event(SseEvent {
            event: self.event_type(),
            data,
            end,
        });
        self.kind.clear();
    }

    /// The event's type: the last `event:` value, when not empty and valid UTF-8.
    fn event_type(&self) -> Option<&str> {
        if self.kind.is_empty() {
            None
        } else {
            std::str::from_utf8(&self.kind).ok()
        }
    }

    /// A blank line (or the end of the stream): dispatches the event if it has data, then
    /// starts a new one.
    fn dispatch(&mut self, chunk: &[u8], end: usize, on_event: &mut impl FnMut(SseEvent<'_>)) {
        let data = match self.state {
            Data::InChunk { start, end } => Some(&chunk[start..end]),
            Data::Buffered => Some(self.data.as_slice()),
            Data::None | Data::Dropped => None,
        };
        if let Some(data) = data {
            on_event(SseEvent {
                event: self.event_type(),
                data,
                end,
            });
        }
        self.state = Data::None;
        self.data.clear();
        shrink(&mut self.data);
        self.kind.clear();
    }
}

/// Where the value of a `data` field line starts (after `data:` and one optional space).
fn data_value_at(line: &[u8]) -> Option<usize> {
    let rest = line.strip_prefix(b"data:")?;
    Some(if rest.first() == Some(&b' ') { 6 } else { 5 })
}

/// Strips a leading byte order mark from the stream's first line.
fn strip_bom(line: &[u8], first: bool) -> &[u8] {
    if first {
        line.strip_prefix(BOM).unwrap_or(line)
    } else {
        line
    }
}

/// Gives back the memory of a buffer that one big event made large.
fn shrink(buf: &mut Vec<u8>) {
    if buf.capacity() > SHRINK_ABOVE {
        buf.shrink_to(KEEP_CAPACITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event as the tests compare them: type, data, and `end` in the stream (absolute).
    type Owned = (Option<String>, Vec<u8>);

    const CHAT: &str = concat!(
        ": keep-alive\n",
        "\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n",
        "\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Héllo, \u{1F30D}\"},\"finish_reason\":null}],\"usage\":null}\n",
        "\n",
        ": ping\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":null}],\"usage\":null}\n",
        "\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n",
        "\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"openai.gpt-oss-120b\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":40,\"total_tokens\":52,\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":8}}}\n",
        "\n",
        "data: [DONE]\n",
        "\n",
    );

    const RESPONSES: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"created_at\":1,\"status\":\"in_progress\",\"model\":\"openai.gpt-oss-120b\",\"output\":[],\"usage\":null}}\n",
        "\n",
        "event: response.in_progress\n",
        "data: {\"type\":\"response.in_progress\",\"sequence_number\":1,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"usage\":null}}\n",
        "\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":2,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Grüße\",\"logprobs\":[]}\n",
        "\n",
        ":\n",
        "event: response.output_text.delta\n",
        "id: 3\n",
        "retry: 1000\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":3,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\" \u{1F30D}\",\"logprobs\":[]}\n",
        "\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"sequence_number\":4,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"usage\":{\"input_tokens\":20,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":7,\"output_tokens_details\":{\"reasoning_tokens\":2},\"total_tokens\":27}}}\n",
        "\n",
    );

    /// A straightforward, whole-input SSE parser the scanner must agree with. Returns the
    /// events with `end` absolute in the stream (0 for the final unterminated one), and every
    /// offset at which the scanner may report a boundary (just past each blank line, and for a
    /// `\r\n` blank line also just past its `\r`).
    fn reference(stream: &[u8]) -> (Vec<(Owned, usize)>, Vec<usize>) {
        let mut events = Vec::new();
        let mut boundaries = vec![0];
        let mut data: Option<Vec<u8>> = None;
        let mut kind = Vec::new();
        let mut pos = 0;
        let mut first = true;
        let mut dispatch = |data: &mut Option<Vec<u8>>, kind: &mut Vec<u8>, end| {
            if let Some(data) = data.take() {
                let kind = String::from_utf8(std::mem::take(kind)).ok();
                events.push(((kind.filter(|k| !k.is_empty()), data), end));
            }
            kind.clear();
        };
        while pos < stream.len() {
            let (mut line, term, next) = match stream[pos..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            {
                Some(i) if stream[pos + i] == b'\r' && stream.get(pos + i + 1) == Some(&b'\n') => {
                    (&stream[pos..pos + i], pos + i, pos + i + 2)
                }
                Some(i) => (&stream[pos..pos + i], pos + i, pos + i + 1),
                None => (&stream[pos..], stream.len(), stream.len()),
            };
            if first {
                line = line.strip_prefix(BOM).unwrap_or(line);
                first = false;
            }
            if line.is_empty() && term < stream.len() {
                if next == term + 2 {
                    boundaries.push(term + 1);
                }
                boundaries.push(next);
                dispatch(&mut data, &mut kind, next);
            } else if line.first() != Some(&b':') {
                let (name, value) = match line.iter().position(|&b| b == b':') {
                    Some(c) => {
                        let v = &line[c + 1..];
                        (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
                    }
                    None => (line, &b""[..]),
                };
                if name == b"data" {
                    match &mut data {
                        Some(d) => {
                            d.push(b'\n');
                            d.extend_from_slice(value);
                        }
                        None => data = Some(value.to_vec()),
                    }
                } else if name == b"event" {
                    kind = value.to_vec();
                }
            }
            pos = next;
        }
        dispatch(&mut data, &mut kind, 0);
        (events, boundaries)
    }

    /// Feeds the chunks in order, then finishes. Returns the events with `end` made absolute,
    /// checking `pending_len` after every chunk against the reference boundaries.
    fn scan(stream: &[u8], cuts: &[usize]) -> Vec<(Owned, usize)> {
        let (_, boundaries) = reference(stream);
        let mut scanner = SseScanner::new();
        let mut events = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain([&stream.len()]) {
            let chunk = &stream[start..cut];
            scanner.feed(chunk, |ev| {
                assert!(ev.end <= chunk.len());
                events.push((
                    (ev.event.map(str::to_owned), ev.data.to_vec()),
                    start + ev.end,
                ));
            });
            let last = boundaries
                .iter()
                .copied()
                .filter(|&b| b <= cut)
                .max()
                .unwrap();
            assert_eq!(scanner.pending_len(), cut - last, "pending after {cut}");
            start = cut;
        }
        scanner.finish(|ev| {
            assert_eq!(ev.end, 0);
            events.push(((ev.event.map(str::to_owned), ev.data.to_vec()), 0));
        });
        assert_eq!(scanner.pending_len(), 0);
        events
    }

    /// Same events as the reference; `end` equal, except one less when the dispatching blank
    /// line's `\r\n` was split between chunks.
    fn assert_matches(stream: &[u8], got: &[(Owned, usize)], what: &str) {
        let (want, _) = reference(stream);
        assert_eq!(got.len(), want.len(), "{what}: event count");
        for ((g, g_end), (w, w_end)) in got.iter().zip(&want) {
            assert_eq!(g, w, "{what}");
            let split_crlf =
                *g_end + 1 == *w_end && stream[*g_end - 1] == b'\r' && stream[*g_end] == b'\n';
            assert!(
                g_end == w_end || split_crlf,
                "{what}: end {g_end} vs {w_end}"
            );
        }
    }

    fn crlf(stream: &str) -> String {
        stream.replace('\n', "\r\n")
    }

    fn check_every_feed(stream: &[u8], expected_events: usize) {
        let whole = scan(stream, &[]);
        assert_eq!(whole.len(), expected_events);
        assert_matches(stream, &whole, "whole");
        // The whole-chunk ends cut the stream into consecutive events at blank lines.
        let mut start = 0;
        for ((_, data), end) in &whole {
            let piece = &stream[start..*end];
            assert!(
                [&b"\n\n"[..], b"\r\n\r\n", b"\r\r"]
                    .iter()
                    .any(|t| piece.ends_with(t))
            );
            assert!(piece.windows(data.len()).any(|w| w == data.as_slice()));
            start = *end;
        }
        assert_eq!(start, stream.len());
        for cut in 0..=stream.len() {
            let got = scan(stream, &[cut]);
            assert_matches(stream, &got, &format!("split at {cut}"));
        }
        let bytes: Vec<usize> = (1..stream.len()).collect();
        assert_matches(stream, &scan(stream, &bytes), "byte by byte");
    }

    #[test]
    fn chat_stream_is_the_same_however_it_is_cut() {
        check_every_feed(CHAT.as_bytes(), 6);
        check_every_feed(crlf(CHAT).as_bytes(), 6);
        check_every_feed(CHAT.replace('\n', "\r").as_bytes(), 6);
        let events = scan(CHAT.as_bytes(), &[]);
        assert!(events.iter().all(|((kind, _), _)| kind.is_none()));
        assert_eq!(events[5].0.1, b"[DONE]");
        assert!(events[4].0.1.starts_with(b"{\"id\":\"chatcmpl-1\""));
    }

    #[test]
    fn responses_stream_is_the_same_however_it_is_cut() {
        check_every_feed(RESPONSES.as_bytes(), 5);
        check_every_feed(crlf(RESPONSES).as_bytes(), 5);
        let kinds: Vec<Option<String>> = scan(RESPONSES.as_bytes(), &[])
            .into_iter()
            .map(|((kind, _), _)| kind)
            .collect();
        let kinds: Vec<&str> = kinds.iter().map(|k| k.as_deref().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.completed"
            ]
        );
    }

    fn events(chunks: &[&[u8]]) -> Vec<Owned> {
        let mut scanner = SseScanner::default();
        let mut out = Vec::new();
        for chunk in chunks {
            scanner.feed(chunk, |ev| {
                out.push((ev.event.map(str::to_owned), ev.data.to_vec()));
            });
        }
        scanner.finish(|ev| out.push((ev.event.map(str::to_owned), ev.data.to_vec())));
        out
    }

    fn data(d: &str) -> Owned {
        (None, d.as_bytes().to_vec())
    }

    #[test]
    fn comments_and_keep_alives_are_ignored() {
        assert!(events(&[b": keep-alive\n\n:\n\n: x\r\n\r\n"]).is_empty());
        assert_eq!(events(&[b": a\ndata: x\n: b\n\n"]), [data("x")]);
    }

    #[test]
    fn data_lines_are_joined_with_newlines() {
        assert_eq!(
            events(&[b"data: a\ndata:b\ndata:  c\ndata\ndata: \n\n"]),
            [data("a\nb\n c\n\n")]
        );
        // A split data line between them is joined too.
        assert_eq!(events(&[b"data: a\nda", b"ta: b\n\n"]), [data("a\nb")]);
    }

    #[test]
    fn fields_follow_the_spec() {
        // An event line without data dispatches nothing and does not leak into the next event.
        assert_eq!(events(&[b"event: ping\n\ndata: x\n\n"]), [data("x")]);
        // The last event line wins; empty type is no type; unknown fields are ignored.
        assert_eq!(
            events(&[
                b"event: a\nevent: b\nfoo: bar\nid: 1\nretry: 5\ndata: x\n\nevent:\ndata: y\n\n"
            ]),
            [(Some("b".into()), b"x".to_vec()), data("y")]
        );
        // A `data` line without colon is data with an empty value.
        assert_eq!(events(&[b"data\n\n"]), [data("")]);
        // A field name is matched exactly.
        assert!(events(&[b"Data: x\ndata : y\n\n"]).is_empty());
    }

    #[test]
    fn event_type_must_be_utf8() {
        assert_eq!(
            events(&[b"event: \xFF\xFE\ndata: x\n\n"]),
            [(None, b"x".to_vec())]
        );
        // Split inside a multi-byte character, it is still whole once the line is.
        assert_eq!(
            events(&[b"event: \xC3", b"\xA9\ndata: x\n\n"]),
            [(Some("\u{E9}".into()), b"x".to_vec())]
        );
    }

    #[test]
    fn a_leading_byte_order_mark_is_ignored() {
        assert_eq!(events(&[b"\xEF\xBB\xBFdata: x\n\n"]), [data("x")]);
        assert_eq!(
            events(&[b"\xEF\xBB", b"\xBFevent: e\ndata: x\n\n"]),
            [(Some("e".into()), b"x".to_vec())]
        );
        // Only at the start of the stream.
        assert!(events(&[b"data: x\n\n\xEF\xBB\xBFdata: y\n\n"]).len() == 1);
    }

    #[test]
    fn finish_dispatches_an_unterminated_event() {
        assert_eq!(events(&[b"data: a\n\ndata: b\n"]), [data("a"), data("b")]);
        assert_eq!(
            events(&[b"data: a\n\ndata: [DONE]"]),
            [data("a"), data("[DONE]")]
        );
        assert_eq!(
            events(&[b"event: e\ndata: x\r"]),
            [(Some("e".into()), b"x".to_vec())]
        );
        assert!(events(&[b"data: a\n\nevent: e\n"]).len() == 1);
        assert!(events(&[b"data: a\n\n: comment"]).len() == 1);
        let mut scanner = SseScanner::new();
        scanner.feed(b"data: a\n", |_| panic!("not yet"));
        assert_eq!(scanner.pending_len(), 8);
        let mut got = Vec::new();
        scanner.finish(|ev| got.push((ev.data.to_vec(), ev.end)));
        assert_eq!(got, [(b"a".to_vec(), 0)]);
        // Then the scanner starts over.
        assert_eq!(scanner.pending_len(), 0);
        scanner.feed(b"data: b\n\n", |ev| got.push((ev.data.to_vec(), ev.end)));
        assert_eq!(got[1], (b"b".to_vec(), 9));
    }

    #[test]
    fn a_cr_at_the_end_of_a_chunk_and_a_lf_in_the_next_are_one_terminator() {
        let mut scanner = SseScanner::new();
        let mut got = Vec::new();
        scanner.feed(b"data: a\r\n\r", |ev| got.push((ev.data.to_vec(), ev.end)));
        assert_eq!(got, [(b"a".to_vec(), 10)]);
        assert_eq!(scanner.pending_len(), 0);
        // The `\n` completes the blank line: no new line, still at a boundary.
        scanner.feed(b"\n", |_| panic!("no event"));
        assert_eq!(scanner.pending_len(), 0);
        scanner.feed(b"data: b\r", |_| panic!("no event"));
        scanner.feed(b"\n", |_| panic!("no event"));
        assert_eq!(scanner.pending_len(), 9);
        scanner.feed(b"\r", |ev| got.push((ev.data.to_vec(), ev.end)));
        assert_eq!(got[1], (b"b".to_vec(), 1));
        scanner.feed(b"\ndata: c\n\n", |ev| got.push((ev.data.to_vec(), ev.end)));
        assert_eq!(got[2], (b"c".to_vec(), 10));
        // `\r` then `\r` is two terminators: a line end and a blank line.
        scanner.feed(b"data: d\r", |_| panic!("no event"));
        scanner.feed(b"\r", |ev| got.push((ev.data.to_vec(), ev.end)));
        assert_eq!(got[3], (b"d".to_vec(), 1));
        scanner.feed(b"x", |_| {});
        assert_eq!(scanner.pending_len(), 1);
    }

    #[test]
    fn a_single_line_inside_the_chunk_is_not_copied() {
        let chunk = b"data: {\"a\":1}\n\nevent: e\ndata: x\n\n";
        let range = chunk.as_ptr_range();
        let mut scanner = SseScanner::new();
        let mut n = 0;
        scanner.feed(chunk, |ev| {
            assert!(range.contains(&ev.data.as_ptr()));
            n += 1;
        });
        assert_eq!(n, 2);
        // Several lines, or a line from an earlier chunk, are gathered in the buffer.
        let chunk = b"data: a\ndata: b\n\ndata: c";
        let range = chunk.as_ptr_range();
        scanner.feed(chunk, |ev| {
            assert_eq!(ev.data, b"a\nb");
            assert!(!range.contains(&ev.data.as_ptr()));
        });
        scanner.feed(b"\n\n", |ev| assert_eq!(ev.data, b"c"));
    }

    /// Feeds `stream` in chunks of `size`; returns the data lengths of the events dispatched.
    fn lengths(scanner: &mut SseScanner, stream: &[u8], size: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for chunk in stream.chunks(size) {
            scanner.feed(chunk, |ev| out.push(ev.data.len()));
        }
        out
    }

    #[test]
    fn an_event_over_the_cap_is_dropped() {
        let big = vec![b'x'; MAX_EVENT_DATA + 1];
        let exact = vec![b'y'; MAX_EVENT_DATA];
        let mut stream = Vec::new();
        stream.extend_from_slice(b"data: ");
        stream.extend_from_slice(&big);
        stream.extend_from_slice(b"\ndata: more\n\ndata: after\n\ndata: ");
        stream.extend_from_slice(&exact);
        stream.extend_from_slice(b"\n\n");
        // Whole (borrowed line), in big chunks (carried line), in small chunks.
        for size in [stream.len(), 1 << 20, 4096] {
            let mut scanner = SseScanner::new();
            assert_eq!(
                lengths(&mut scanner, &stream, size),
                [5, MAX_EVENT_DATA],
                "chunks of {size}"
            );
            assert!(scanner.line.capacity() <= MAX_LINE + KEEP_CAPACITY);
            assert!(scanner.event.data.capacity() <= KEEP_CAPACITY);
        }
        // Many lines adding up to more than the cap.
        let line = vec![b'z'; 1 << 20];
        let mut stream = Vec::new();
        for _ in 0..17 {
            stream.extend_from_slice(b"data:");
            stream.extend_from_slice(&line);
            stream.push(b'\n');
        }
        stream.extend_from_slice(b"\nevent: e\ndata: ok\n\n");
        let mut scanner = SseScanner::new();
        assert_eq!(lengths(&mut scanner, &stream, 65536), [2]);
        // A huge comment or unknown field is skipped without dropping its event.
        let mut stream = b"data: kept\n:".to_vec();
        stream.extend_from_slice(&big);
        stream.extend_from_slice(b"\nid");
        stream.extend_from_slice(&big);
        stream.extend_from_slice(b"\n\n");
        let mut scanner = SseScanner::new();
        assert_eq!(lengths(&mut scanner, &stream, 1 << 20), [4]);
    }

    #[test]
    fn a_long_line_fed_byte_by_byte_scans_in_linear_time() {
        // Quadratic re-scanning of the carried line would take hours here.
        let mut stream = b"data: ".to_vec();
        stream.resize(4 * 1024 * 1024, b'a');
        stream.extend_from_slice(b"\r\n\r\n");
        let mut scanner = SseScanner::new();
        assert_eq!(lengths(&mut scanner, &stream, 1), [4 * 1024 * 1024 - 6]);
    }

    /// A tiny deterministic generator, so the test needs no dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            usize::try_from(self.0 % n as u64).unwrap()
        }
    }

    #[test]
    fn random_streams_cut_at_random_agree_with_the_reference() {
        const PIECES: [&[u8]; 16] = [
            b"data: x",
            b"data:",
            b"data",
            b"event: e",
            b"event:\xC3\xA9",
            b": c",
            b"id: 1",
            b"",
            b"data: \xF0\x9F\x8C\x8D",
            b"retry",
            b"\xEF\xBB\xBFdata: b",
            b"dat",
            b"a: y",
            b"event",
            b" data: n",
            b"data:  two",
        ];
        const ENDS: [&[u8]; 3] = [b"\n", b"\r", b"\r\n"];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..3000 {
            let mut stream = Vec::new();
            for _ in 0..rng.below(12) {
                stream.extend_from_slice(PIECES[rng.below(PIECES.len())]);
                stream.extend_from_slice(ENDS[rng.below(ENDS.len())]);
            }
            if rng.below(2) == 0 {
                stream.extend_from_slice(PIECES[rng.below(PIECES.len())]);
            }
            let mut cuts: Vec<usize> = (0..rng.below(6))
                .map(|_| rng.below(stream.len() + 1))
                .collect();
            cuts.sort_unstable();
            let got = scan(&stream, &cuts);
            assert_matches(
                &stream,
                &got,
                &format!("{:?} cut at {cuts:?}", String::from_utf8_lossy(&stream)),
            );
        }
    }
}
