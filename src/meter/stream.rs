//! The meter of one response body: watches frames as they are relayed, strips the usage chunk
//! mantlegate asked for on the client's behalf, and says at the end what the call used.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::sse::SseScanner;
use super::usage::{self, ChatChunk, ResponsesEvent};
use super::{Usage, UsageSource};

/// Largest non-streamed body kept (as shared references to the relayed chunks) for reading its
/// usage at the end; bigger ones are relayed without it and recorded as `missing`.
const MAX_JSON_BODY: usize = 64 * 1024 * 1024;

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
    /// Estimated input tokens, from the request body's size.
    input_estimate: u64,
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
            // About four bytes per token, the usual rule of thumb for English text and JSON.
            input_estimate: (request_bytes / 4) as u64,
        }
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
                let (usage, content) = (&mut self.usage, &mut self.content_events);
                self.scanner.feed(chunk, |ev| {
                    chat_event(ev.data, usage, content);
                });
            }
            Kind::ResponsesStream => {
                let (usage, content, id, status) = (
                    &mut self.usage,
                    &mut self.content_events,
                    &mut self.response_id,
                    &mut self.response_status,
                );
                self.scanner.feed(chunk, |ev| {
                    match usage::responses_event(ev.event, ev.data) {
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
                            if u.is_some() {
                                *usage = u;
                            }
                        }
                        ResponsesEvent::Delta => *content += 1,
                        ResponsesEvent::Error | ResponsesEvent::Other => {}
                    }
                });
            }
        }
    }

    /// Takes a frame and queues what the client should get of it (event-aligned, with the
    /// injected usage chunk removed). Read the result with [`BodyMeter::next_out`].
    pub fn relay(&mut self, chunk: &Bytes) {
        let mut cuts: Vec<(usize, bool)> = Vec::new();
        let (usage, content) = (&mut self.usage, &mut self.content_events);
        self.scanner.feed(chunk, |ev| {
            let drop = chat_event(ev.data, usage, content);
            cuts.push((ev.end, drop));
        });
        let mut start = 0;
        for (end, drop) in cuts {
            let piece = chunk.slice(start..end);
            if drop {
                self.carry.clear();
            } else if self.carry.is_empty() {
                self.out.push_back(piece);
            } else {
                self.carry.extend_from_slice(&piece);
                self.out.push_back(self.carry.split().freeze());
            }
            start = end;
        }
        if start < chunk.len() {
            self.carry.extend_from_slice(&chunk[start..]);
        }
    }

    /// Queues a piece for the client after those already queued.
    pub fn push_out(&mut self, piece: Bytes) {
        self.out.push_back(piece);
    }

    /// The next piece queued by [`BodyMeter::relay`].
    pub fn next_out(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// End of the upstream body: bytes still held (a last event without its blank line).
    pub fn finish_relay(&mut self) -> Option<Bytes> {
        let (usage, content) = (&mut self.usage, &mut self.content_events);
        let mut dropped = false;
        self.scanner.finish(|ev| {
            dropped = chat_event(ev.data, usage, content);
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

/// Applies one chat stream event to the meter; returns whether it is the usage-only chunk.
fn chat_event(data: &[u8], usage: &mut Option<Usage>, content: &mut u64) -> bool {
    match usage::chat_chunk(data) {
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
        ChatChunk::Done | ChatChunk::Error | ChatChunk::Other => false,
    }
}
