//! Logging set-up: RUST_LOG-style filters, plain or JSON lines on stdout, and `log` records
//! (aya-log's kernel messages) forwarded to tracing.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (upstream's default).
    Plain,
    /// One JSON object per line.
    Json,
}

/// Renders an error with its whole cause chain: `a: b: c`.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// Replaces the log filter of the running process.
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The installed filter's reload hook and its current text.
static FILTER: std::sync::OnceLock<(Reload, std::sync::Mutex<String>)> = std::sync::OnceLock::new();

/// The log filter in force.
pub fn current_filter() -> String {
    FILTER
        .get()
        .map(|(_, text)| text.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default()
}

/// Changes the log filter at run time (RUST_LOG syntax), e.g. `info,access=off`.
pub fn set_filter(filter: &str) -> Result<(), String> {
    let parsed = parse_filter(filter)?;
    let (reload, text) = FILTER.get().ok_or("logging is not initialised")?;
    reload(parsed)?;
    *text.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_string();
    tracing::info!(filter, "log filter changed");
    Ok(())
}

/// `text` as shown in a log line or an error when it came from outside: at most `max_chars`
/// characters, then how long it was (`...(N bytes)`), so no peer or control plane can make
/// the agent write a line of any length.
pub fn cut(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_string(),
        Some((end, _)) => format!("{}... ({} bytes)", &text[..end], text.len()),
    }
}

/// Parses a log filter (RUST_LOG syntax) from outside the agent (the command line, the admin
/// API). The syntax is ASCII, and anything else is refused up front: tracing-subscriber's
/// parser (0.3.23) panics on some non-ASCII input (found by the `admin_query` fuzz target),
/// and a parser panic is caught as well, so no filter text can take the agent down (the
/// panic hook still prints the panic to stderr).
pub fn parse_filter(filter: &str) -> Result<EnvFilter, String> {
    let invalid = |why: String| {
        format!("invalid log filter {filter:?}: {why} (RUST_LOG syntax, e.g. info,access=off)")
    };
    if let Some(c) = filter.chars().find(|c| !c.is_ascii()) {
        return Err(invalid(format!("{c:?} is not ASCII")));
    }
    match std::panic::catch_unwind(|| EnvFilter::try_new(filter)) {
        Ok(Ok(parsed)) => Ok(parsed),
        Ok(Err(e)) => Err(invalid(e.to_string())),
        Err(_) => Err(invalid("the filter parser failed on it".into())),
    }
}

/// Installs the global subscriber. A bad filter falls back to `info` and says so.
pub fn init(filter: &str, format: LogFormat) {
    let (env_filter, bad) = match parse_filter(filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    // The reload handle's type depends on the event format, so each format is built whole.
    macro_rules! install {
        ($format:expr) => {{
            let builder = tracing_subscriber::fmt()
                .with_env_filter(env_filter)
                .with_writer(|| RingTee)
                .with_ansi(false)
                .event_format($format)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            let reload: Reload = Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()));
            (builder.try_init(), reload)
        }};
    }
    let (installed, reload) = match format {
        LogFormat::Plain => install!(PlainFormat),
        LogFormat::Json => install!(JsonFormat),
    };
    if installed.is_err() {
        return;
    }
    let text = if bad.is_some() { "info" } else { filter };
    let _ = FILTER.set((reload, std::sync::Mutex::new(text.to_string())));
    if let Some(e) = bad {
        tracing::warn!(error = %e, "invalid RUST_LOG filter; using info");
    }
}

/// Log lines kept in memory for `/debug/logs` and `ztunnel-agent bug-report`.
pub const RECENT_LOG_LINES: usize = 1000;
/// Longer lines are kept cut to this many bytes (the ring stays under about 2 MiB).
const RECENT_LOG_LINE_BYTES: usize = 2048;

static RECENT_LOGS: std::sync::Mutex<std::collections::VecDeque<String>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// The last `n` log lines the agent wrote (oldest first), at most [`RECENT_LOG_LINES`].
pub fn recent_log_lines(n: usize) -> Vec<String> {
    let ring = RECENT_LOGS.lock().unwrap_or_else(|p| p.into_inner());
    ring.iter()
        .skip(ring.len().saturating_sub(n))
        .cloned()
        .collect()
}

fn remember_log(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let mut ring = RECENT_LOGS.lock().unwrap_or_else(|p| p.into_inner());
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut line = line.to_string();
        if line.len() > RECENT_LOG_LINE_BYTES {
            let mut cut = RECENT_LOG_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str(" [cut]");
        }
        if ring.len() == RECENT_LOG_LINES {
            ring.pop_front();
        }
        ring.push_back(line);
    }
}

/// Standard output, with each line also kept in the recent-lines ring. The formatter hands
/// over each event whole in one write.
struct RingTee;

impl std::io::Write for RingTee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Kept first: when stdout breaks, the ring still has what a bug report needs.
        remember_log(buf);
        std::io::Write::write_all(&mut std::io::stdout().lock(), buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut std::io::stdout().lock())
    }
}

/// A subscriber writing the agent's plain lines to `writer` (tests install it for one thread
/// with `tracing::subscriber::set_default` to read what a component logged).
pub fn plain_subscriber<W>(filter: &str, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(writer)
        .with_ansi(false)
        .event_format(PlainFormat)
        .finish()
}

/// `unix` seconds as RFC 3339 UTC (`2026-11-22T10:00:00Z`).
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix).map_or_else(
        |_| unix.to_string(),
        |t| {
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        },
    )
}

/// `2024-05-04T09:59:05.028709Z`: RFC 3339, UTC, microseconds (upstream's timestamps).
fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

fn level_name(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        tracing::Level::DEBUG => "debug",
        tracing::Level::TRACE => "trace",
    }
}

/// Upstream's plain lines: time, level, target and message separated by tabs, then the
/// fields as `key=value` (strings quoted).
struct PlainFormat;

impl<S, N> FormatEvent<S, N> for PlainFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        write!(
            writer,
            "{}\t{}\t{}\t",
            timestamp(),
            level_name(meta.level()),
            meta.target()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        if let Some(spans) = span_context(ctx, event) {
            write!(writer, " span={spans:?}")?;
        }
        writeln!(writer)
    }
}

/// The spans an event happened in (a connection's `outbound{id=7 src.addr=...}`), root first,
/// for any event but the access log's own line (whose fields are a fixed contract).
fn span_context<S, N>(ctx: &FmtContext<'_, S, N>, event: &Event<'_>) -> Option<String>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    if event.metadata().target() == "access" {
        return None;
    }
    let scope = ctx.event_scope()?;
    let mut out = String::new();
    for span in scope.from_root() {
        if !out.is_empty() {
            out.push(':');
        }
        out.push_str(span.name());
        let extensions = span.extensions();
        if let Some(fields) = extensions.get::<tracing_subscriber::fmt::FormattedFields<N>>() {
            if !fields.is_empty() {
                let _ = write!(out, "{{{fields}}}");
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// One JSON object per line: the event's fields plus `level`, `time`, `scope`, `message`.
struct JsonFormat;

#[derive(Default)]
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.0.insert(field.name().into(), text.into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        if let Some(spans) = span_context(ctx, event) {
            fields.0.insert("span".into(), spans.into());
        }
        let mut object = serde_json::Map::new();
        object.insert("level".into(), level_name(meta.level()).into());
        object.insert("time".into(), timestamp().into());
        object.insert("scope".into(), meta.target().into());
        object.append(&mut fields.0);
        let line = serde_json::to_string(&object).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_from_outside_are_refused_not_panicked_on() {
        assert!(parse_filter("info,access=off").is_ok());
        // The fuzz target's crash input: tracing-subscriber's parser panics on it.
        let e = parse_filter(" fo\u{8f41b}=2iv%").expect_err("refused");
        assert!(
            e.contains("is not ASCII") && e.contains("RUST_LOG syntax"),
            "{e}"
        );
        let e = parse_filter("info,[{").expect_err("refused");
        assert!(e.starts_with("invalid log filter"), "{e}");
    }
}
