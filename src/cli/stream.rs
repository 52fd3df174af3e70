//! `impasto stream IN --style S -o OUT`: a live stream in, painted live out. IN and OUT are anything
//! FFmpeg reads and writes (`tcp://`, `udp://`, `srt://`, `rtmp://`, `-` for a pipe, or a file). A
//! status line a second (or a JSON line per painted frame with `--json`), a summary at the end.
//! Ctrl-C or SIGTERM ends the stream cleanly: the frame being painted is finished and sent and the
//! output is closed; a second signal gives up a send that waits (the output is then left unfinished),
//! a third exits at once.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use impasto::pipeline::{Pace, StreamFrame, StreamJob, StreamStop, StreamSummary};
use serde_json::json;

use super::model::ModelFlags;
use super::video::{VideoFlags, read_styles};

/// Arguments of `impasto stream`.
#[derive(Args, Debug)]
pub struct StreamArgs {
    /// The input stream: a URL FFmpeg reads (tcp://, udp://, srt://, rtmp://, http://), `-` for
    /// standard input, or a file.
    pub input: String,
    /// Style image(s); repeat for a blend.
    #[arg(long, short, required = true)]
    pub style: Vec<PathBuf>,
    /// Where the painted stream goes: a URL, `-` for standard output, or a file (written under a
    /// temporary name, renamed into place when the stream ends; an HLS playlist, NAME.m3u8, is
    /// written in place with its segments as the stream goes).
    #[arg(long, short)]
    pub output: String,
    /// Output container (FFmpeg muxer name: mpegts, flv, matroska, …). Default: flv for rtmp://,
    /// mpegts for other URLs and pipes, the extension's for a file.
    #[arg(long, short = 'f')]
    pub format: Option<String>,
    /// live: paint the newest frame and drop those there was no time for (the output stays at most
    /// two frames' painting behind); every-frame: paint them all (the input is read only as fast).
    #[arg(long, default_value = "live")]
    pub pace: Pace,
    /// One JSON line per painted frame and a summary (on stderr when the stream goes to stdout).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub video_flags: VideoFlags,
    #[command(flatten)]
    pub model_flags: ModelFlags,
}

/// Runs `impasto stream`.
pub fn run(args: StreamArgs) -> Result<()> {
    if args.video_flags.carry_curvature == Some(true) {
        let problem = "--carry-curvature: a live stream paints each frame on its own; it applies to video jobs";
        return Err(impasto::Error::Settings(problem.into()).into());
    }
    let profile = args.video_flags.profile()?;
    let video = args.video_flags.apply_video(profile.video);
    let style = args.video_flags.apply_style(profile.style);
    let model_settings = args.model_flags.apply(profile.model);
    style.validate()?;
    video.validate()?;
    let styles = read_styles(&args.style)?;
    let input = pipe_name(&args.input, 0);
    let output = pipe_name(&args.output, 1);
    let lines = Lines { json: args.json, to_stderr: output == "pipe:1", last_line: Cell::new(None) };
    let job = StreamJob {
        input: input.clone(),
        output: output.clone(),
        output_format: args.format.clone(),
        styles,
        style,
        video,
        pace: args.pace,
    };
    let stop = stop_on_signals();
    let device = model_settings.device.to_string();
    let summary = super::catch_torch(&device, || {
        let vgg = impasto::model::load(&model_settings)?;
        job.run(&vgg, &stop, &mut |frame| lines.frame(frame))
    })
    .with_context(|| format!("painting the stream '{input}'"))?;
    lines.summary(&summary);
    let ended = summary.broke_off.as_deref().unwrap_or("the stream ended");
    if summary.frames_painted == 0 {
        bail!("{ended} before a frame of '{input}' was painted; nothing was written to '{output}'");
    }
    if summary.broke_off.is_some() {
        bail!("{ended}; '{output}' holds the {} frames painted before, closed properly", summary.frames_painted);
    }
    Ok(())
}

/// FFmpeg's name for standard input (`fd` 0) or output (1) when the user wrote `-`.
fn pipe_name(location: &str, fd: u8) -> String {
    if location == "-" { format!("pipe:{fd}") } else { location.to_string() }
}

/// The flags the signal handler raises.
static STOP: OnceLock<StreamStop> = OnceLock::new();

/// How many stop signals came.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// SIGINT and SIGTERM: the first asks the stream to finish, the second to give up sending too, the
/// third exits at once.
extern "C" fn on_signal(_: libc::c_int) {
    // only atomics and fcntl here: nothing else is safe in a signal handler
    let Some(stop) = STOP.get() else { return };
    match SIGNALS.fetch_add(1, Ordering::SeqCst) {
        0 => stop.finish.store(true, Ordering::SeqCst),
        1 => stop.abort.store(true, Ordering::SeqCst),
        _ => {
            // stdin and stdout are not left non-blocking for whoever shares them
            impasto::media::restore_pipes();
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) }
        }
    }
}

/// The stop flags Ctrl-C and SIGTERM raise. FFmpeg polls them while it waits for the network or a
/// pipe (stream pipes are non-blocking while in use), so the handler restarts interrupted calls.
fn stop_on_signals() -> StreamStop {
    let stop = STOP.get_or_init(StreamStop::default).clone();
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid; the handler only
    // touches an already-initialised static and atomics.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        for signal in [libc::SIGINT, libc::SIGTERM] {
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    stop
}

/// Where and how the progress lines go: JSON for every frame, or a line in words at most once a
/// second (a card paints many frames a second).
struct Lines {
    json: bool,
    to_stderr: bool,
    last_line: Cell<Option<Instant>>,
}

impl Lines {
    fn print(&self, line: String) {
        if self.json && !self.to_stderr {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    }

    /// One painted frame.
    fn frame(&self, frame: &StreamFrame) {
        let due = self.last_line.get().is_none_or(|last| last.elapsed() >= Duration::from_secs(1));
        if !self.json && !due {
            return;
        }
        self.last_line.set(Some(Instant::now()));
        if self.json {
            self.print(event_line("frame", frame));
            return;
        }
        self.print(format!(
            "impasto: frame {} ({:.2} s) painted in {:.1} s, {} iterations; {:.1} s behind the input; {} painted, {} dropped",
            frame.index, frame.time, frame.seconds, frame.iterations, frame.latency, frame.painted, frame.dropped
        ));
    }

    /// The closing line.
    fn summary(&self, summary: &StreamSummary) {
        if self.json {
            self.print(event_line("summary", summary));
            return;
        }
        let ended = match (summary.stopped, summary.connection_closed) {
            (true, _) => "stopped on request",
            (false, true) => "the input's connection closed (or was lost: RTMP and SRT cannot tell)",
            (false, false) => "the input ended",
        };
        self.print(format!(
            "impasto: {ended}; {} of {} frames painted ({} dropped) into {}, {:.2} s per frame, {:.1} s behind on average, {:.0} s in all",
            summary.frames_painted,
            summary.frames_in,
            summary.frames_dropped,
            summary.output,
            summary.seconds_per_frame,
            summary.mean_latency,
            summary.wall_seconds
        ));
    }
}

/// A JSON line: `{"event": event}` with `fields`' own fields beside it.
fn event_line(event: &str, fields: &impl serde::Serialize) -> String {
    let mut line = json!({ "event": event });
    if let (Some(object), Ok(serde_json::Value::Object(fields))) = (line.as_object_mut(), serde_json::to_value(fields))
    {
        object.extend(fields);
    }
    line.to_string()
}
