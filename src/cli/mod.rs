//! Command-line interface: subcommands, logging set-up, and the one place that maps errors to
//! messages and exit codes (0 success, 1 runtime failure, 2 usage or settings, 3 bad input file,
//! 4 device or memory).

/// Copies each named flag that was given (`Some`) onto the settings field of the same name.
macro_rules! apply_flags {
    ($flags:expr => $settings:expr; $($field:ident),* $(,)?) => {
        $( if let Some(value) = &$flags.$field { $settings.$field = value.clone(); } )*
    };
}

mod bench;
#[cfg(feature = "media")]
mod eval;
mod image;
mod model;
mod progress;
mod score;
#[cfg(feature = "service")]
mod serve;
#[cfg(feature = "media")]
mod stream;
#[cfg(feature = "media")]
mod video;

use clap::{Parser, Subcommand};
use impasto::Error;

/// impasto: turns images and videos into paintings (Gatys, Ecker & Bethge), steady from frame to frame.
#[derive(Parser, Debug)]
#[command(name = "impasto", version, about, propagate_version = true)]
struct Cli {
    /// Log filter (e.g. `info`, `impasto=debug`); also IMPASTO_LOG. Default: warn (serve: info).
    #[arg(long, global = true, env = "IMPASTO_LOG")]
    log: Option<String>,
    /// libtorch CPU threads (default: libtorch's choice, one per core). On a shared machine, or for
    /// small frames, fewer threads are often faster.
    #[arg(long, global = true, env = "IMPASTO_THREADS", value_parser = clap::value_parser!(i32).range(1..=1024))]
    threads: Option<i32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stylize a still image.
    Image(image::ImageArgs),
    /// Paint a video, steady from frame to frame (resumes after a crash when run again).
    #[cfg(feature = "media")]
    Video(video::VideoArgs),
    /// Paint a live stream as it comes (tcp://, udp://, srt://, rtmp://, a pipe), dropping the frames
    /// there is no time for.
    #[cfg(feature = "media")]
    Stream(stream::StreamArgs),
    /// Measure how steady a painted video is (warping error E_warp against its input's flow).
    #[cfg(feature = "media")]
    Eval(eval::EvalArgs),
    /// Measure an output's style and content distances (plain VGG, max pooling).
    Score(score::ScoreArgs),
    /// Time optimisation iterations at several sizes; prints JSON.
    Bench(bench::BenchArgs),
    /// Manage model weights.
    Model(model::ModelArgs),
    /// Run the rendering daemon: watch folders, job store, workers per device, HTTP API and dashboard.
    #[cfg(feature = "service")]
    Serve(serve::ServeArgs),
}

/// Exit codes.
pub mod exit {
    /// Runtime failure.
    pub const FAILURE: i32 = 1;
    /// Usage or settings error.
    pub const USAGE: i32 = 2;
    /// Bad input file (image, weights, video).
    pub const BAD_INPUT: i32 = 3;
    /// Device unavailable or out of memory.
    pub const DEVICE: i32 = 4;
}

/// Exit code for an error.
fn exit_code(error: &anyhow::Error) -> i32 {
    match error.downcast_ref::<Error>() {
        Some(Error::Settings(_)) => exit::USAGE,
        Some(Error::Image { .. } | Error::Weights { .. } | Error::NoModel(_) | Error::Io { .. }) => exit::BAD_INPUT,
        Some(Error::Device { .. } | Error::OutOfMemory { .. }) => exit::DEVICE,
        #[cfg(feature = "media")]
        Some(Error::Media(media)) => media_exit_code(media),
        _ => exit::FAILURE,
    }
}

/// Exit code for a video error: the user's files are bad input, impossible encode settings are usage.
#[cfg(feature = "media")]
fn media_exit_code(error: &impasto::media::MediaError) -> i32 {
    use impasto::media::MediaError as M;
    match error {
        error if error.is_bad_settings() => exit::USAGE,
        error if error.is_bad_input() => exit::BAD_INPUT,
        M::Io { .. } | M::OutputDirectory { .. } => exit::BAD_INPUT,
        _ => exit::FAILURE,
    }
}

/// Runs the program; returns the exit code.
pub fn main() -> i32 {
    impasto::device::heap::keep_freed_memory();
    let cli = Cli::parse();
    quiet_torch_panics();
    if let Some(threads) = cli.threads {
        tch::set_num_threads(threads);
    }
    #[cfg(feature = "service")]
    if let Command::Serve(args) = &cli.command {
        return finish(serve_command(args, cli.log.as_deref()));
    }
    install_logging(cli.log.as_deref().unwrap_or("warn"), false);
    let result = match cli.command {
        Command::Image(args) => image::run(args),
        #[cfg(feature = "media")]
        Command::Video(args) => video::run(args),
        #[cfg(feature = "media")]
        Command::Stream(args) => stream::run(args),
        #[cfg(feature = "media")]
        Command::Eval(args) => eval::run(args),
        Command::Score(args) => score::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Model(args) => model::run(args),
        #[cfg(feature = "service")]
        Command::Serve(_) => unreachable!("handled above"),
    };
    finish(result)
}

/// Loads the daemon's configuration (so that its log settings apply), installs logging, runs it.
#[cfg(feature = "service")]
fn serve_command(args: &serve::ServeArgs, log: Option<&str>) -> anyhow::Result<()> {
    let config = match serve::load_config(args) {
        Ok(config) => config,
        Err(error) => {
            install_logging(log.unwrap_or("warn"), false);
            return Err(error);
        }
    };
    let filter = log.or(config.log.level.as_deref()).unwrap_or("info");
    install_logging(filter, config.log.format == impasto::service::config::LogFormat::Json);
    serve::run(config)
}

/// Prints an error and gives the exit code.
fn finish(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("error: {}", error_message(&error));
            exit_code(&error)
        }
    }
}

/// The error and its causes, each cause left out when the message before already says it (typed
/// errors often quote their source).
fn error_message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

fn install_logging(filter: &str, json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// libtorch errors surface as panics inside tch; `catch_torch` turns them into errors, so the default
/// hook's backtrace noise is kept for real bugs only.
fn quiet_torch_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = impasto::error::panic_text(info.payload());
        if !text.contains("Torch(") && !text.contains("TchError") {
            default_hook(info);
        }
    }));
}

/// Runs libtorch work, turning its panics (out of memory, shape errors) into typed errors.
pub fn catch_torch<T>(device: &str, work: impl FnOnce() -> impasto::Result<T>) -> impasto::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(result) => result,
        Err(payload) => Err(Error::from_torch_message(device, &impasto::error::panic_text(payload.as_ref()))),
    }
}
