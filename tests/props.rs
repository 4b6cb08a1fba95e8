//! Properties of the meter and the upstream parser: any split of a valid stream or answer reads
//! as the whole does; no input, however broken, makes the SSE scanner, the usage extractor or
//! the upstream response parser panic.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;

use mantlegate::meter::sse::SseScanner;
use mantlegate::meter::stream::{BodyMeter, Kind, Metered};
use mantlegate::meter::{Usage, UsageSource, usage};

/// One event as the scanner reports it, owned; `end` is absolute in the stream, `None` when
/// the event was dispatched by `finish`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    event: Option<String>,
    data: Vec<u8>,
    end: Option<usize>,
}

/// Cut points (sorted, distinct, inside the stream) from arbitrary indexes.
fn cuts(len: usize, at: &[Index]) -> Vec<usize> {
    let mut cuts: Vec<usize> = at.iter().map(|i| i.index(len + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// `stream` cut at `cuts` (empty pieces included, as a transport may deliver them).
fn pieces<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &c in cuts {
        out.push(&stream[start..c]);
        start = c;
    }
    out.push(&stream[start..]);
    out
}

fn scan(chunks: &[&[u8]]) -> Vec<Seen> {
    let mut scanner = SseScanner::new();
    let mut seen = Vec::new();
    let mut offset = 0;
    for chunk in chunks {
        scanner.feed(chunk, |ev| {
            seen.push(Seen {
                event: ev.event.map(str::to_owned),
                data: ev.data.to_vec(),
                end: Some(offset + ev.end),
            });
        });
        offset += chunk.len();
    }
    scanner.finish(|ev| {
        seen.push(Seen {
            event: ev.event.map(str::to_owned),
            data: ev.data.to_vec(),
            end: None,
        });
    });
    seen
}

/// Whole and split scans agree; an end may fall one byte early where a `\r\n` terminator
/// was split between chunks (the `\n` then opens the next chunk, as documented).
fn assert_same_scan(stream: &[u8], whole: &[Seen], split: &[Seen]) -> Result<(), TestCaseError> {
    prop_assert_eq!(whole.len(), split.len());
    for (w, s) in whole.iter().zip(split) {
        prop_assert_eq!(&w.event, &s.event);
        prop_assert_eq!(&w.data, &s.data);
        match (w.end, s.end) {
            (Some(we), Some(se)) if se + 1 == we => {
                prop_assert_eq!(&stream[se - 1..we], b"\r\n");
            }
            (we, se) => prop_assert_eq!(we, se),
        }
    }
    Ok(())
}

/// The meter's verdict, comparable.
fn verdict(
    m: &Metered,
) -> (
    Usage,
    Option<UsageSource>,
    Option<String>,
    Option<String>,
    bool,
) {
    (
        m.usage,
        m.source,
        m.response_id.clone(),
        m.response_status.clone(),
        m.background,
    )
}

/// Runs `kind`'s meter over the chunks: what it would relay and what it found.
fn meter(kind: Kind, chunks: &[&[u8]]) -> (Vec<u8>, Metered) {
    let mut m = BodyMeter::new(kind, 100);
    let mut out = Vec::new();
    for chunk in chunks {
        let chunk = Bytes::copy_from_slice(chunk);
        if m.rewrites() {
            m.relay(&chunk);
            while let Some(piece) = m.next_out() {
                out.extend_from_slice(&piece);
            }
        } else {
            m.observe(&chunk);
            out.extend_from_slice(&chunk);
        }
    }
    if m.rewrites() {
        if let Some(rest) = m.finish_relay() {
            m.push_out(rest);
        }
        while let Some(piece) = m.next_out() {
            out.extend_from_slice(&piece);
        }
    } else {
        // As the relay does when the upstream body ends.
        m.finish_observe();
    }
    let result = m.result(true, true);
    (out, result)
}

// --- Valid streams, built with what the scanner must report. ---

#[derive(Debug, Clone)]
struct Style {
    newline: &'static str,
    /// `data: ` or `data:`.
    space: bool,
    bom: bool,
    /// Indexes of events sent as pretty (multi-line) JSON.
    pretty: Vec<bool>,
    /// Indexes of events preceded by a comment line.
    comment: Vec<bool>,
    /// The last event's blank line never comes (the stream is cut right after it).
    unterminated: bool,
}

fn style() -> impl Strategy<Value = Style> {
    (
        prop::sample::select(vec!["\n", "\r\n", "\r"]),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(any::<bool>(), 16),
        prop::collection::vec(any::<bool>(), 16),
        any::<bool>(),
    )
        .prop_map(
            |(newline, space, bom, pretty, comment, unterminated)| Style {
                newline,
                space,
                bom,
                pretty,
                comment,
                unterminated,
            },
        )
}

/// A built stream: its bytes, the events in it, and the byte range of each event's segment
/// (its comment, lines and blank line).
struct Built {
    bytes: Vec<u8>,
    events: Vec<(Option<String>, String)>,
    segments: Vec<std::ops::Range<usize>>,
}

fn build(events: &[(Option<&str>, serde_json::Value)], style: &Style) -> Built {
    let nl = style.newline;
    let mut bytes = Vec::new();
    if style.bom {
        bytes.extend_from_slice(b"\xEF\xBB\xBF");
    }
    let mut seen = Vec::new();
    let mut segments = Vec::new();
    for (i, (name, value)) in events.iter().enumerate() {
        let start = if i == 0 { 0 } else { bytes.len() };
        if style.comment[i % style.comment.len()] {
            bytes.extend_from_slice(format!(": keep-alive{nl}").as_bytes());
        }
        if let Some(name) = name {
            bytes.extend_from_slice(format!("event: {name}{nl}").as_bytes());
        }
        let data = match value {
            serde_json::Value::String(s) if s == "[DONE]" => s.clone(),
            v if style.pretty[i % style.pretty.len()] => {
                serde_json::to_string_pretty(v).expect("json")
            }
            v => v.to_string(),
        };
        for line in data.split('\n') {
            // Without the space, a line opening with one would lose it (SSE strips one).
            let prefix = if style.space || line.starts_with(' ') {
                "data: "
            } else {
                "data:"
            };
            bytes.extend_from_slice(format!("{prefix}{line}{nl}").as_bytes());
        }
        if !(style.unterminated && i + 1 == events.len()) {
            bytes.extend_from_slice(nl.as_bytes());
        }
        segments.push(start..bytes.len());
        seen.push((name.map(str::to_owned), data));
    }
    Built {
        bytes,
        events: seen,
        segments,
    }
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "a", "b", " ", "\"", "\\", "data: ", "\n", "\r", "é", "😀", "[DONE]", "usage", ":",
            "{", "}",
        ]),
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

#[derive(Debug, Clone)]
struct Counts {
    input: u64,
    cached: u64,
    output: u64,
    reasoning: u64,
}

fn counts() -> impl Strategy<Value = Counts> {
    (0..1_000_000u64, 0..1_000_000u64).prop_flat_map(|(input, output)| {
        (0..=input, 0..=output).prop_map(move |(cached, reasoning)| Counts {
            input,
            cached,
            output,
            reasoning,
        })
    })
}

fn chat_stream(
    contents: &[String],
    counts: Option<&Counts>,
) -> Vec<(Option<&'static str>, serde_json::Value)> {
    let mut events: Vec<(Option<&str>, serde_json::Value)> = contents
        .iter()
        .map(|c| {
            (
                None,
                serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": "m", "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": null}]}),
            )
        })
        .collect();
    events.push((
        None,
        serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    ));
    if let Some(c) = counts {
        events.push((
            None,
            serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": [], "usage": {"prompt_tokens": c.input, "completion_tokens": c.output,
            "total_tokens": c.input + c.output, "prompt_tokens_details": {"cached_tokens": c.cached},
            "completion_tokens_details": {"reasoning_tokens": c.reasoning}}}),
        ));
    }
    events.push((None, serde_json::Value::String("[DONE]".to_owned())));
    events
}

fn responses_stream(
    deltas: &[String],
    counts: &Counts,
    named: bool,
    terminal: &'static str,
) -> Vec<(Option<&'static str>, serde_json::Value)> {
    let name = |n: &'static str| named.then_some(n);
    let mut events = vec![(
        name("response.created"),
        serde_json::json!({"type": "response.created", "sequence_number": 0,
        "response": {"id": "resp_prop", "object": "response", "status": "in_progress", "usage": null}}),
    )];
    for (i, d) in deltas.iter().enumerate() {
        events.push((
            name("response.output_text.delta"),
            serde_json::json!({"type": "response.output_text.delta", "sequence_number": i + 1, "delta": d}),
        ));
    }
    let status = terminal.trim_start_matches("response.");
    events.push((
        name(terminal),
        serde_json::json!({"type": terminal, "sequence_number": deltas.len() + 1,
        "response": {"id": "resp_prop", "object": "response", "status": status,
        "usage": {"input_tokens": counts.input, "output_tokens": counts.output,
        "total_tokens": counts.input + counts.output,
        "input_tokens_details": {"cached_tokens": counts.cached},
        "output_tokens_details": {"reasoning_tokens": counts.reasoning}}}}),
    ));
    events
}

fn usage_of(c: &Counts) -> Usage {
    Usage {
        input: c.input,
        cached_input: c.cached,
        output: c.output,
        reasoning: c.reasoning,
    }
}

/// A JSON-ish soup: the tokens the extractor looks for, in any order.
fn json_soup() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            " ",
            "\n",
            "\"",
            "\\",
            "\"\\\"",
            "null",
            "true",
            "1",
            "-1",
            "1.5",
            "1e400",
            "18446744073709551616",
            "\"usage\"",
            "\"choices\"",
            "\"error\"",
            "\"response\"",
            "\"type\"",
            "\"id\"",
            "\"status\"",
            "\"object\"",
            "\"background\"",
            "\"prompt_tokens\"",
            "\"completion_tokens\"",
            "\"input_tokens\"",
            "\"output_tokens\"",
            "\"cached_tokens\"",
            "\"reasoning_tokens\"",
            "\"prompt_tokens_details\"",
            "\"input_tokens_details\"",
            "\"completed\"",
            "\"response.completed\"",
            "\"response.created\"",
            "\"error\"",
            "[DONE]",
            "\u{0}",
            "\u{ff}",
        ]),
        0..64,
    )
    .prop_map(|t| t.concat().into_bytes())
}

/// Every extractor on `data`, and every meter kind over `chunks`: none may panic.
fn extract_everything(data: &[u8], event: Option<&str>, chunks: &[&[u8]]) {
    let _ = usage::chat_chunk(data);
    let _ = usage::responses_event(event, data);
    let _ = usage::responses_event(None, data);
    let _ = usage::chat_usage(data);
    let _ = usage::responses_usage(data);
    let _ = usage::response_object(data);
    let _ = usage::is_terminal(&String::from_utf8_lossy(data));
    for kind in [
        Kind::None,
        Kind::ChatJson,
        Kind::ResponseJson,
        Kind::ChatStream { strip_usage: true },
        Kind::ChatStream { strip_usage: false },
        Kind::ResponsesStream,
    ] {
        let _ = meter(kind, chunks);
    }
}

/// 256 cases a property; failures print their minimal input (no regression files).
fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn any_split_of_a_chat_stream_scans_and_meters_as_the_whole(
        contents in prop::collection::vec(text(), 0..6),
        counts in prop::option::of(counts()),
        style in style(),
        at in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let built = build(&chat_stream(&contents, counts.as_ref()), &style);
        let stream = &built.bytes;
        let whole = scan(&[stream.as_slice()]);
        let expected: Vec<(Option<String>, String)> = whole
            .iter()
            .map(|s| (s.event.clone(), String::from_utf8_lossy(&s.data).into_owned()))
            .collect();
        prop_assert_eq!(&expected, &built.events, "the scanner reads what was built");
        let cuts = cuts(stream.len(), &at);
        let split = pieces(stream, &cuts);
        assert_same_scan(stream, &whole, &scan(&split))?;

        for strip in [true, false] {
            let kind = Kind::ChatStream { strip_usage: strip };
            let (whole_out, whole_m) = meter(kind, &[stream.as_slice()]);
            let (split_out, split_m) = meter(kind, &split);
            prop_assert_eq!(&whole_out, &split_out);
            prop_assert_eq!(verdict(&whole_m), verdict(&split_m));
            if let Some(c) = &counts {
                prop_assert_eq!(whole_m.usage, usage_of(c));
                prop_assert_eq!(whole_m.source, Some(UsageSource::Reported));
            } else {
                prop_assert_eq!(whole_m.source, Some(UsageSource::Estimated));
            }
            // Stripping removes exactly the usage chunk's segment, nothing else.
            let kept: Vec<u8> = if strip && counts.is_some() {
                let usage_at = built.segments.len() - 2;
                built
                    .segments
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != usage_at)
                    .flat_map(|(_, r)| stream[r.clone()].iter().copied())
                    .collect()
            } else {
                stream.clone()
            };
            prop_assert_eq!(whole_out, kept);
        }
    }

    #[test]
    fn any_split_of_a_responses_stream_scans_and_meters_as_the_whole(
        deltas in prop::collection::vec(text(), 0..6),
        counts in counts(),
        named in any::<bool>(),
        terminal in prop::sample::select(vec!["response.completed", "response.incomplete", "response.failed"]),
        style in style(),
        at in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let built = build(&responses_stream(&deltas, &counts, named, terminal), &style);
        let stream = &built.bytes;
        let whole = scan(&[stream.as_slice()]);
        prop_assert_eq!(whole.len(), built.events.len());
        let cuts = cuts(stream.len(), &at);
        let split = pieces(stream, &cuts);
        assert_same_scan(stream, &whole, &scan(&split))?;

        let (_, whole_m) = meter(Kind::ResponsesStream, &[stream.as_slice()]);
        let (_, split_m) = meter(Kind::ResponsesStream, &split);
        prop_assert_eq!(verdict(&whole_m), verdict(&split_m));
        prop_assert_eq!(whole_m.usage, usage_of(&counts));
        prop_assert_eq!(whole_m.source, Some(UsageSource::Reported));
        prop_assert_eq!(whole_m.response_id.as_deref(), Some("resp_prop"));
        prop_assert_eq!(
            whole_m.response_status.as_deref(),
            Some(terminal.trim_start_matches("response."))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        data in prop::collection::vec(any::<u8>(), 0..2048),
        event in prop::option::of(any::<String>()),
        at in prop::collection::vec(any::<Index>(), 0..16),
    ) {
        let cuts = cuts(data.len(), &at);
        let split = pieces(&data, &cuts);
        // A scanner reused for a second stream after `finish` as well.
        let mut scanner = SseScanner::new();
        for _ in 0..2 {
            for chunk in &split {
                scanner.feed(chunk, |ev| {
                    let _ = (ev.event, ev.data.len(), ev.end);
                });
                let _ = scanner.pending_len();
            }
            scanner.finish(|ev| {
                let _ = usage::chat_chunk(ev.data);
                let _ = usage::responses_event(ev.event, ev.data);
            });
        }
        extract_everything(&data, event.as_deref(), &split);
    }

    #[test]
    fn json_soup_never_panics(
        data in json_soup(),
        at in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let cuts = cuts(data.len(), &at);
        let split = pieces(&data, &cuts);
        extract_everything(&data, Some("response.completed"), &split);
        // The same soup as SSE data lines.
        let mut sse = b"data: ".to_vec();
        sse.extend_from_slice(&data);
        sse.extend_from_slice(b"\n\n");
        extract_everything(&sse, None, &pieces(&sse, &cuts));
    }
}

#[test]
fn deep_nesting_never_panics_nor_overflows_the_stack() {
    for unit in [
        &b"["[..],
        b"{\"usage\":",
        b"{\"response\":",
        b"{\"choices\":[",
        b"\"",
    ] {
        let data = unit.repeat(1_000_000 / unit.len());
        let mut sse = b"data: ".to_vec();
        sse.extend_from_slice(&data);
        sse.extend_from_slice(b"\n\n");
        extract_everything(&data, Some("response.completed"), &[&data]);
        extract_everything(&sse, None, &[&sse[..sse.len() / 2], &sse[sse.len() / 2..]]);
    }
}

#[test]
fn a_responses_stream_cut_after_its_terminal_event_still_meters() {
    let counts = Counts {
        input: 30,
        cached: 10,
        output: 7,
        reasoning: 2,
    };
    let style = Style {
        newline: "\n",
        space: true,
        bom: false,
        pretty: vec![false],
        comment: vec![false],
        unterminated: true,
    };
    let built = build(
        &responses_stream(&["hi".to_owned()], &counts, true, "response.completed"),
        &style,
    );
    let (_, m) = meter(Kind::ResponsesStream, &[built.bytes.as_slice()]);
    assert_eq!(m.source, Some(UsageSource::Reported));
    assert_eq!(m.usage, usage_of(&counts));
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn any_split_of_a_crlf_chat_stream_relays_the_same_bytes(
        contents in prop::collection::vec(text(), 0..6),
        counts in counts(),
        style in style(),
        at in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let style = Style { newline: "\r\n", ..style };
        let built = build(&chat_stream(&contents, Some(&counts)), &style);
        let stream = &built.bytes;
        let kind = Kind::ChatStream { strip_usage: true };
        let (whole_out, _) = meter(kind, &[stream.as_slice()]);
        let (split_out, _) = meter(kind, &pieces(stream, &cuts(stream.len(), &at)));
        prop_assert_eq!(whole_out, split_out);
    }
}

#[test]
fn relay_splits_a_crlf_blank_line_before_the_usage_chunk() {
    let stream = b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\n\r\ndata: [DONE]\r\n\r\n";
    let first_blank = memchr::memmem::find(stream, b"\r\n\r\n").expect("blank line") + 3;
    // The first chunk ends right after the `\r` of the blank line before the usage chunk.
    let (whole, _) = meter(Kind::ChatStream { strip_usage: true }, &[stream]);
    let (split, _) = meter(
        Kind::ChatStream { strip_usage: true },
        &[&stream[..first_blank], &stream[first_blank..]],
    );
    assert_eq!(
        String::from_utf8_lossy(&split),
        String::from_utf8_lossy(&whole)
    );
}

// --- The upstream response parser (head, then body in every framing). ---

use mantlegate::upstream::fuzzing::{End, Framing, Method, read_in_pieces};

/// How a generated answer frames its body.
#[derive(Debug, Clone)]
enum Framed {
    Length,
    Chunked {
        bare_lf: bool,
        trailers: bool,
    },
    /// `Content-Length` beside `Transfer-Encoding: chunked`: read as chunked.
    Both,
    Close,
}

fn framed() -> impl Strategy<Value = Framed> {
    prop_oneof![
        Just(Framed::Length),
        (any::<bool>(), any::<bool>())
            .prop_map(|(bare_lf, trailers)| Framed::Chunked { bare_lf, trailers }),
        Just(Framed::Both),
        Just(Framed::Close),
    ]
}

/// An answer with `body` framed as `framed`, the body cut into chunks at `at`.
fn answer(body: &[u8], framed: &Framed, at: &[Index], interim: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if interim {
        out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n");
    let chunked = |bare_lf: bool, trailers: bool, out: &mut Vec<u8>| {
        let nl: &[u8] = if bare_lf { b"\n" } else { b"\r\n" };
        for piece in pieces(body, &cuts(body.len(), at)) {
            if piece.is_empty() {
                continue;
            }
            out.extend_from_slice(format!("{:x};ext=1", piece.len()).as_bytes());
            out.extend_from_slice(nl);
            out.extend_from_slice(piece);
            out.extend_from_slice(nl);
        }
        out.extend_from_slice(b"0");
        out.extend_from_slice(nl);
        if trailers {
            out.extend_from_slice(b"x-trailer: t");
            out.extend_from_slice(nl);
        }
        out.extend_from_slice(nl);
    };
    match framed {
        Framed::Length => {
            out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(body);
        }
        Framed::Chunked { bare_lf, trailers } => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            chunked(*bare_lf, *trailers, &mut out);
        }
        Framed::Both => {
            out.extend_from_slice(b"content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n");
            chunked(false, false, &mut out);
        }
        Framed::Close => {
            out.extend_from_slice(b"connection: close\r\n\r\n");
            out.extend_from_slice(body);
        }
    }
    out
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn any_split_of_an_upstream_answer_reads_as_the_whole(
        body in prop::collection::vec(any::<u8>(), 0..300),
        framed in framed(),
        chunks_at in prop::collection::vec(any::<Index>(), 0..6),
        interim in any::<bool>(),
        at in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let wire = answer(&body, &framed, &chunks_at, interim);
        let whole = read_in_pieces([wire.as_slice()], &Method::POST)
            .expect("a valid head")
            .expect("a whole head");
        prop_assert_eq!(whole.status, 200);
        prop_assert_eq!(&whole.body, &body);
        prop_assert_eq!(&whole.end, &End::Complete);
        let expected_framing = match framed {
            Framed::Length if body.is_empty() => Framing::Empty,
            Framed::Length => Framing::Length(body.len() as u64),
            Framed::Chunked { .. } | Framed::Both => Framing::Chunked,
            Framed::Close => Framing::Close,
        };
        prop_assert_eq!(whole.framing, expected_framing);
        prop_assert!(
            !whole.headers.iter().any(|(n, _)| n == "content-length")
                || !whole.headers.iter().any(|(n, _)| n == "transfer-encoding"),
            "never both framings: {:?}", whole.headers
        );
        let split = read_in_pieces(pieces(&wire, &cuts(wire.len(), &at)), &Method::POST);
        prop_assert_eq!(split, Ok(Some(whole)));
    }

    #[test]
    fn a_broken_upstream_answer_never_panics_and_reads_the_same_however_split(
        body in prop::collection::vec(any::<u8>(), 0..200),
        framed in framed(),
        chunks_at in prop::collection::vec(any::<Index>(), 0..6),
        damage in prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        cut_off in any::<Option<Index>>(),
        at in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let mut wire = answer(&body, &framed, &chunks_at, false);
        for (i, byte) in damage {
            let i = i.index(wire.len());
            wire[i] = byte;
        }
        if let Some(c) = cut_off {
            wire.truncate(c.index(wire.len() + 1));
        }
        let whole = read_in_pieces([wire.as_slice()], &Method::POST);
        let split = read_in_pieces(pieces(&wire, &cuts(wire.len(), &at)), &Method::POST);
        prop_assert_eq!(&whole, &split);
        let bytewise = read_in_pieces(wire.chunks(1), &Method::POST);
        prop_assert_eq!(whole, bytewise);
    }

    #[test]
    fn any_bytes_as_a_body_never_panic_and_read_the_same_however_split(
        body in prop::collection::vec(any::<u8>(), 0..400),
        chunked in any::<bool>(),
        at in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let mut wire = if chunked {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".to_vec()
        };
        wire.extend_from_slice(&body);
        let whole = read_in_pieces([wire.as_slice()], &Method::POST);
        let split = read_in_pieces(pieces(&wire, &cuts(wire.len(), &at)), &Method::POST);
        prop_assert_eq!(whole, split);
    }
}
