//! The JSON log line, written by hand.
//!
//! tracing-subscriber's JSON formatter builds each line through serde and formats the
//! timestamp field by field. With two access-log lines per tunnel that was about a tenth of
//! the proxy's CPU per tunnel (`benches/RESULTS.md`, logging on against off). This writes the
//! same line (`timestamp`, `level`, the event's fields in order, then `target`) straight into
//! the buffer the subscriber hands over; a test holds it to tracing-subscriber's output.

use std::cell::RefCell;
use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// One JSON object per event, one event per line.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, SystemTime::now())?;
        write!(writer, "\",\"level\":\"{}\"", event.metadata().level())?;
        let mut fields = Fields {
            out: &mut writer,
            log_target: None,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        let target = fields.log_target.take();
        writer.write_str(",\"target\":")?;
        write_string(
            &mut writer,
            target.as_deref().unwrap_or(event.metadata().target()),
        )?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct Fields<'w, 'a> {
    out: &'w mut Writer<'a>,
    /// Events bridged from the `log` crate carry their real target as a field.
    log_target: Option<String>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.out.write_str(",\"")?;
        self.out.write_str(field.name())?;
        self.out.write_str("\":")
    }

    /// Records one field unless it is the `log` bridge's metadata.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        if field.name().starts_with("log.") {
            return;
        }
        self.result = self.key(field).and_then(|()| value(self.out));
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "log.target" {
            self.log_target = Some(value.to_string());
        }
        self.field(field, |out| write_string(out, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                out.write_str("null")
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(Escaped(&mut *out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

fn write_string(out: &mut impl Write, value: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(&mut *out).write_str(value)?;
    out.write_char('"')
}

/// Escapes what JSON strings may not hold: quotes, backslashes and control characters.
struct Escaped<W>(W);

impl<W: Write> Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut clean = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 | 0x7f => "",
                _ => continue,
            };
            self.0.write_str(&s[clean..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            clean = i + 1;
        }
        self.0.write_str(&s[clean..])
    }
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber writes it:
/// `2026-11-23T16:37:08.998039Z`. The date and time of day change once a second, so they are
/// formatted once a second per thread.
/// `2026-12-02T01:02:03.000004Z`, as in the log lines.
pub fn timestamp(time: SystemTime) -> String {
    let mut out = String::with_capacity(27);
    let _ = write_timestamp(&mut out, time);
    out
}

fn write_timestamp(out: &mut impl Write, now: SystemTime) -> fmt::Result {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            text.clear();
            let (year, month, day) = civil_from_days(secs / 86_400);
            let of_day = secs % 86_400;
            let (h, m, s) = (of_day / 3600, of_day / 60 % 60, of_day % 60);
            write!(text, "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}")?;
            *cached = secs;
        }
        out.write_str(text)
    })?;
    write!(out, ".{:06}Z", since.subsec_micros())
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn dates_match_the_calendar() {
        for (days, date) in [
            (0, (1970, 1, 1)),
            (59, (1970, 3, 1)),
            (11_016, (2000, 2, 29)),
            (20_415, (2025, 11, 23)),
            (20_780, (2026, 11, 23)),
            (24_837, (2038, 1, 1)),
        ] {
            assert_eq!(civil_from_days(days), date, "day {days}");
        }
        let mut text = String::new();
        let at = UNIX_EPOCH + Duration::from_micros(1_795_451_828_998_039);
        write_timestamp(&mut text, at).unwrap();
        assert_eq!(text, "2026-11-23T16:37:08.998039Z");
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn events() {
        let client: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
        tracing::info!(
            target: "access",
            event = "decision",
            client = %client,
            host = "a.\"quoted\"\\.example\n\u{1}\u{7f}é",
            port = 443u16,
            bytes = 12u64,
            delta = -3i64,
            ok = true,
            ratio = 0.5f64,
            debug = ?Some("x"),
        );
        tracing::warn!(open = 3, "draining for up to {:?}", Duration::from_secs(30));
        tracing::error!(error = %std::io::Error::other("boom \"x\""), "failed");
    }

    /// Parsed lines, the timestamps blanked (they differ between the two runs).
    fn lines(buffer: &Buffer) -> Vec<serde_json::Value> {
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| {
                let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
                let stamp = value["timestamp"].as_str().unwrap().to_string();
                assert_eq!(stamp.len(), 27, "{stamp}");
                value["timestamp"] = "".into();
                value
            })
            .collect()
    }

    #[test]
    fn lines_match_tracing_subscribers_json() {
        let ours = Buffer::default();
        let theirs = Buffer::default();
        let writer = ours.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        let writer = theirs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        // Field order too, which parsing hides: what a human scanning the log sees first.
        let raw = String::from_utf8(ours.0.lock().unwrap().clone()).unwrap();
        assert!(
            raw.starts_with("{\"timestamp\":\"") && raw.contains("\"level\":\"INFO\",\"event\""),
            "{raw}"
        );
        let (ours, theirs) = (lines(&ours), lines(&theirs));
        assert_eq!(ours.len(), 3);
        assert_eq!(ours, theirs);
    }
}
