//! The hook through which a client traces its calls without linking a tracing SDK.
//!
//! `reflex replay` makes one span per replayed call and hands its context to the target as
//! `traceparent`, so the target's `act` span continues the replay's trace. The replayer
//! only sees these two traits; the `reflex` binary passes in the implementation it has
//! (the server's OpenTelemetry pipeline), and a library caller may pass none. This keeps
//! the OpenTelemetry SDK, and the server that owns it, out of the replayer's dependencies.

use tonic::metadata::MetadataMap;

/// Starts a client-side span per call.
pub trait CallTracer: Send + Sync {
    /// The span of the call that replays record `seq`; it ends when dropped.
    fn start(&self, seq: u64) -> Box<dyn CallSpan>;
}

/// One call's span.
pub trait CallSpan: Send {
    /// Writes the span's trace context into the call's outgoing metadata (`traceparent`);
    /// nothing when the span is not sampled.
    fn inject(&self, metadata: &mut MetadataMap);
    /// Marks the call failed: `slug` as the error type, `message` as the status.
    fn fail(&self, slug: &'static str, message: &str);
}
