//! `impasto stream` as a user runs it: a real MPEG-TS stream of a shared clip served over a real TCP
//! socket, a pipe, or RTMP and SRT with the ffmpeg CLI at the other end, painted with the real VGG-16
//! and real FFmpeg, sent to another socket, server or file. Checked with ffprobe: every frame arrives
//! painted with its timestamp (every-frame pace); a live stream drops what it has no time for but
//! never reorders or invents a frame; Ctrl-C closes the output properly, also while a pipe is
//! silent or a named pipe has no writer yet; bad inputs name the stream and leave nothing behind. Tiny sizes, few iterations, one
//! libtorch thread.
#![cfg(feature = "media")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{entries, ffmpeg, frame_timestamps, sound_timestamps, stderr};
use serde_json::Value;
use tempfile::TempDir;

/// `impasto stream INPUT --style starry_night -o OUTPUT --device cpu --json` at 64 px, two
/// iterations a frame after the first, plus `extra`.
fn stream_command(input: &str, output: &str, extra: &[&str]) -> Command {
    let mut command = common::impasto("stream-cache");
    command
        .arg("stream")
        .arg(input)
        .arg("--style")
        .arg(common::media("paintings/starry_night.jpg"))
        .arg("-o")
        .arg(output)
        .args(["--device", "cpu", "--json", "--size", "64", "-n", "2"])
        .args(extra);
    command
}

/// `dir/bikes.ts`: the first `frames` frames of the shared bikes.mp4 (which has hard cuts and no
/// sound) as an MPEG-TS stream, as a live encoder would send it.
fn bikes_stream(dir: &Path, frames: u32) -> PathBuf {
    let path = dir.join("bikes.ts");
    let source = common::media("video/bikes.mp4");
    let frames = frames.to_string();
    ffmpeg(&[
        "-i",
        source.to_str().unwrap(),
        "-frames:v",
        &frames,
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-g",
        "10",
        "-f",
        "mpegts",
        path.to_str().unwrap(),
    ]);
    path
}

/// `dir/bunny.ts`: the first half second of the shared bigbuckbunny.mp4, picture and sound (AAC),
/// as an MPEG-TS stream.
fn bunny_stream(dir: &Path) -> PathBuf {
    let path = dir.join("bunny.ts");
    let source = common::media("video/bigbuckbunny.mp4");
    let (source, target) = (source.to_str().unwrap(), path.to_str().unwrap());
    ffmpeg(&[
        "-i", source, "-t", "0.5", "-c:v", "libx264", "-preset", "veryfast", "-g", "10", "-c:a", "aac", "-f", "mpegts",
        target,
    ]);
    path
}

/// How many packets each stream of a file holds, by type (`video`, `audio`), in file order.
fn packet_counts(path: &Path) -> Vec<(String, u64)> {
    let output = Command::new("ffprobe")
        .args(["-v", "error", "-count_packets", "-show_entries", "stream=codec_type,nb_read_packets", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (kind, count) = line.split_once(',')?;
            Some((kind.to_string(), count.trim().parse().ok()?))
        })
        .collect()
}

/// Serves `bytes` to the first client of a new port on 127.0.0.1, in `chunks` pieces with `pause`
/// between them, then closes the connection. Returns the port.
fn serve(bytes: Vec<u8>, chunks: usize, pause: Duration) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sender = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        for piece in bytes.chunks(bytes.len().div_ceil(chunks)) {
            if client.write_all(piece).is_err() {
                return; // the client went away (a stop request)
            }
            std::thread::sleep(pause);
        }
    });
    (port, sender)
}

/// Takes everything the first client of a new port on 127.0.0.1 sends. Returns the port.
fn collect() -> (u16, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut bytes = Vec::new();
        client.read_to_end(&mut bytes).unwrap();
        bytes
    });
    (port, receiver)
}

/// The first frame of a video as RGB24 at `width`×`height`.
fn first_frame_rgb(path: &Path, width: u32, height: u32) -> Vec<u8> {
    let size = format!("{width}x{height}");
    let output = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-frames:v", "1", "-s", &size, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(output.status.success());
    output.stdout
}

/// The JSON lines a run printed, by event.
fn events(output: &Output, kind: &str) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["event"] == kind)
        .collect()
}

/// Each timestamp minus the first.
fn from_first(timestamps: &[i64]) -> Vec<i64> {
    timestamps.iter().map(|t| t - timestamps[0]).collect()
}

#[test]
fn every_frame_of_a_tcp_stream_comes_out_painted_on_another_socket_with_its_timestamp_and_sound() {
    let dir = TempDir::new().unwrap();
    let input = bunny_stream(dir.path());
    let (input_port, sender) = serve(std::fs::read(&input).unwrap(), 1, Duration::ZERO);
    let (output_port, receiver) = collect();
    let run = stream_command(
        &format!("tcp://127.0.0.1:{input_port}"),
        &format!("tcp://127.0.0.1:{output_port}"),
        &["--pace", "every-frame", "--first-iterations", "60"],
    )
    .output()
    .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    sender.join().unwrap();
    let painted = dir.path().join("painted.ts");
    std::fs::write(&painted, receiver.join().unwrap()).unwrap();

    let (input_pts, output_pts) = (frame_timestamps(&input), frame_timestamps(&painted));
    let frame_count = input_pts.len() as u64;
    assert!(frame_count >= 12, "{frame_count} frames");
    assert_eq!(from_first(&output_pts), from_first(&input_pts), "every frame, each at its own time");
    let input_packets = packet_counts(&input);
    assert_eq!(input_packets[1].0, "audio");
    assert_eq!(packet_counts(&painted)[1], input_packets[1], "every sound packet, passed through");
    let summary = &events(&run, "summary")[0];
    let frames_painted = (summary["frames_in"].as_u64(), summary["frames_painted"].as_u64());
    assert_eq!(frames_painted, (Some(frame_count), Some(frame_count)));
    assert_eq!(summary["frames_dropped"].as_u64(), Some(0));
    assert_eq!(summary["stopped"], false);
    let frames = events(&run, "frame");
    let indices: Vec<u64> = frames.iter().map(|f| f["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, (0..frame_count).collect::<Vec<u64>>());
    assert_eq!(frames[1]["start"], "warped", "later frames start from the previous painting");

    // 64×36 working frames; the painting is far from the picture
    let (original, stylized) = (first_frame_rgb(&input, 64, 36), first_frame_rgb(&painted, 64, 36));
    let difference =
        original.iter().zip(&stylized).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / original.len() as f64;
    assert!(difference > 12.0, "the first frame is barely painted: mean difference {difference:.1} of 255");
}

#[test]
fn a_stream_whose_timestamps_jump_back_goes_on_with_its_picture_and_sound_together() {
    let dir = TempDir::new().unwrap();
    // 50 frames (2 s) whose sound runs on past the picture, then the same clip from its start again,
    // as from a sender that restarted: both tracks' timestamps jump back, by different amounts
    let first = dir.path().join("first.ts");
    let source = common::media("video/bigbuckbunny.mp4");
    let (source, target) = (source.to_str().unwrap(), first.to_str().unwrap());
    ffmpeg(&[
        "-i",
        source,
        "-t",
        "2.3",
        "-frames:v",
        "50",
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-c:a",
        "aac",
        "-f",
        "mpegts",
        target,
    ]);
    let second = bunny_stream(dir.path());
    let spliced = dir.path().join("spliced.ts");
    std::fs::write(&spliced, [std::fs::read(&first).unwrap(), std::fs::read(&second).unwrap()].concat()).unwrap();
    let output = dir.path().join("spliced-painted.ts");
    let extra = ["--pace", "every-frame", "--first-iterations", "4"];
    let run = stream_command(spliced.to_str().unwrap(), output.to_str().unwrap(), &extra).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));

    let (input_pts, output_pts) = (frame_timestamps(&spliced), frame_timestamps(&output));
    assert!(input_pts.windows(2).any(|pair| pair[1] < pair[0]), "the input jumps back");
    assert_eq!(output_pts.len(), input_pts.len(), "no frame lost");
    assert!(output_pts.windows(2).all(|pair| pair[0] < pair[1]), "the output's timestamps rise: {output_pts:?}");
    let output_sound = sound_timestamps(&output);
    assert_eq!(output_sound.len(), sound_timestamps(&spliced).len(), "every sound packet");
    assert!(output_sound.windows(2).all(|pair| pair[0] < pair[1]), "the sound's timestamps rise");
    // the second part's sound starts where it did against its picture (MPEG-TS ticks: 90 kHz)
    let first_sound_packets = sound_timestamps(&first).len();
    let second_video_starts = frame_timestamps(&second)[0];
    let second_sound_starts = sound_timestamps(&second)[0];
    let expected = second_sound_starts - second_video_starts;
    let got = output_sound[first_sound_packets] - output_pts[50];
    assert!((got - expected).abs() <= 90, "sound {:.1} ms off its picture", (got - expected) as f64 / 90.0);
}

#[test]
fn a_live_stream_drops_what_it_cannot_paint_never_reorders_or_invents_a_frame_and_goes_out_at_source_size() {
    let dir = TempDir::new().unwrap();
    let input = bikes_stream(dir.path(), 40);
    // the whole stream arrives at once: far faster than it can be painted
    let (port, sender) = serve(std::fs::read(&input).unwrap(), 1, Duration::ZERO);
    let output = dir.path().join("live.ts");
    // a first frame of 100 iterations takes far longer than reading 40 small frames from a local socket
    let extra = ["--first-iterations", "100", "--output-size", "source"];
    let run = stream_command(&format!("tcp://127.0.0.1:{port}"), output.to_str().unwrap(), &extra).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    sender.join().unwrap();

    let summary = &events(&run, "summary")[0];
    let count = |key: &str| summary[key].as_u64().unwrap();
    assert_eq!(count("frames_in"), 40);
    assert_eq!(count("frames_painted") + count("frames_dropped"), 40);
    assert!(count("frames_dropped") > 0, "live pace waited for the painter");
    let input_pts = frame_timestamps(&input);
    let output_pts = frame_timestamps(&output);
    assert_eq!(output_pts.len() as u64, count("frames_painted"));
    let painted: Vec<usize> = events(&run, "frame").iter().map(|f| f["index"].as_u64().unwrap() as usize).collect();
    assert!(painted.windows(2).all(|pair| pair[0] < pair[1]), "in order: {painted:?}");
    assert_eq!(painted.last(), Some(&39), "the newest frame is always painted");
    // each painted frame keeps its own input timestamp (relative to the first painted one)
    let expected: Vec<i64> = painted.iter().map(|&index| input_pts[index]).collect();
    assert_eq!(from_first(&output_pts), from_first(&expected));
    assert_eq!(entries(dir.path()), ["bikes.ts", "live.ts"], "no temporary file is left");
    let video = &common::ffprobe(&output)["streams"][0];
    let size = (video["width"].as_u64(), video["height"].as_u64());
    assert_eq!(size, (Some(640), Some(272)), "painted at 64 px, sent at the source's size");
}

#[test]
fn ctrl_c_finishes_the_frame_being_painted_and_closes_the_output_file() {
    let dir = TempDir::new().unwrap();
    let input = bikes_stream(dir.path(), 60);
    // a slow sender: 60 pieces a quarter of a second apart, so the stream is still running when stopped
    let (port, sender) = serve(std::fs::read(&input).unwrap(), 60, Duration::from_millis(250));
    let output = dir.path().join("stopped.mp4");
    let mut child =
        stream_command(&format!("tcp://127.0.0.1:{port}"), output.to_str().unwrap(), &["--first-iterations", "12"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let first_frame = line.contains(r#""event":"frame""#);
        printed.push(line);
        if first_frame {
            // SAFETY: a plain signal to our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            break;
        }
    }
    printed.extend(lines.map(Result::unwrap));
    let status = child.wait().unwrap();
    let mut errors = String::new();
    child.stderr.take().unwrap().read_to_string(&mut errors).unwrap();
    assert!(status.success(), "{errors}");
    sender.join().unwrap();

    let summary: Value = printed
        .iter()
        .find_map(|l| serde_json::from_str(l).ok().filter(|v: &Value| v["event"] == "summary"))
        .expect("a summary");
    assert_eq!(summary["stopped"], true);
    let painted = summary["frames_painted"].as_u64().unwrap();
    assert!(painted >= 1, "{summary}");
    assert_eq!(frame_timestamps(&output).len() as u64, painted, "a complete MP4 with every painted frame");
    assert_eq!(entries(dir.path()), ["bikes.ts", "stopped.mp4"]);
}

#[test]
fn a_receiver_that_hangs_up_ends_the_stream_with_an_error_even_while_the_input_is_silent() {
    let dir = TempDir::new().unwrap();
    // six seconds: more than FFmpeg reads ahead (5 s) to learn a stream's format
    let bytes = std::fs::read(bikes_stream(dir.path(), 150)).unwrap();
    // the input sends the stream, then keeps the connection open and silent
    let input = TcpListener::bind("127.0.0.1:0").unwrap();
    let input_port = input.local_addr().unwrap().port();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let sender = std::thread::spawn(move || {
        let (mut client, _) = input.accept().unwrap();
        let _ = client.write_all(&bytes);
        let _ = released.recv();
    });
    // the receiver hangs up at once
    let output = TcpListener::bind("127.0.0.1:0").unwrap();
    let output_url = format!("tcp://127.0.0.1:{}", output.local_addr().unwrap().port());
    let receiver = std::thread::spawn(move || drop(output.accept().unwrap()));
    let extra = ["--first-iterations", "2", "--output-size", "source"];
    let mut child = stream_command(&format!("tcp://127.0.0.1:{input_port}"), &output_url, &extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // a guard, not a measurement: a hang fails this test instead of stalling the suite
    let status = wait_or_kill(&mut child, Duration::from_secs(120));
    let mut errors = String::new();
    child.stderr.take().unwrap().read_to_string(&mut errors).unwrap();
    // the server threads end whether or not impasto reached them
    release.send(()).unwrap();
    drop(TcpStream::connect(("127.0.0.1", input_port)));
    drop(TcpStream::connect(output_url.trim_start_matches("tcp://")));
    sender.join().unwrap();
    receiver.join().unwrap();
    let status = status.expect("impasto kept waiting for its silent input after its receiver hung up");
    assert!(!status.success(), "{errors}");
    assert!(errors.contains(&output_url), "the error names the output: {errors}");
}

/// Waits for a `child` whose output is piped, and takes its output; a guard, not a measurement,
/// kills it after two minutes (its status is then `None`), so a hang fails a test instead of
/// stalling the suite.
fn output_or_kill(mut child: std::process::Child) -> (Option<std::process::ExitStatus>, Output) {
    let status = wait_or_kill(&mut child, Duration::from_secs(120));
    (status, child.wait_with_output().unwrap())
}

/// Waits for `child` to exit; kills it and gives `None` after `limit`.
fn wait_or_kill(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_streams_are_named_in_the_error_and_leave_nothing_behind() {
    let dir = TempDir::new().unwrap();
    let output = dir.path().join("out.ts");
    let closed_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let refused = format!("tcp://127.0.0.1:{closed_port}");
    let garbage = dir.path().join("garbage.ts");
    std::fs::write(&garbage, (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<u8>>())
        .unwrap();
    let missing = dir.path().join("missing.ts");

    for (input, says) in [
        (refused.as_str(), "refused"),
        (garbage.to_str().unwrap(), "invalid data"),
        (missing.to_str().unwrap(), "no such file"),
    ] {
        let run = stream_command(input, output.to_str().unwrap(), &["--first-iterations", "2"]).output().unwrap();
        let message = stderr(&run).to_lowercase();
        assert!(!run.status.success(), "{input} was accepted");
        assert!(message.contains(&input.to_lowercase()) && message.contains(says), "{input}: {message}");
    }
    // a setting of video jobs that a stream cannot honour is refused as usage, before anything opens
    let carried = stream_command(garbage.to_str().unwrap(), output.to_str().unwrap(), &["--carry-curvature", "true"])
        .output()
        .unwrap();
    assert_eq!(carried.status.code(), Some(2), "{}", stderr(&carried));
    assert!(stderr(&carried).contains("--carry-curvature"), "{}", stderr(&carried));
    assert_eq!(entries(dir.path()), ["garbage.ts"]);
}

/// The lines `output` gives, read on their own thread, so that a test can wait for one with a guard
/// against a run that never prints it; the channel closes when `output` does.
fn lines_of(output: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let _ = sender.send(line.unwrap());
        }
    });
    lines
}

/// The index of the frame a JSON line reports painted, if it is such a line.
fn painted_index(line: &str) -> Option<u64> {
    let event: Value = serde_json::from_str(line).ok()?;
    (event["event"] == "frame").then(|| event["index"].as_u64()).flatten()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until a socket listens on `port` (`protocol` "tcp") or is bound to it ("udp"), as
/// `/proc/net` lists it, so that a client is not started before its server. Panics after a minute (a
/// guard, not a measurement).
fn wait_for_port(protocol: &str, port: u16) {
    let started = std::time::Instant::now();
    let wanted = format!(":{port:04X}");
    loop {
        let table = std::fs::read_to_string(format!("/proc/net/{protocol}")).unwrap();
        let open = table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&wanted) && (protocol == "udp" || fields[3] == "0A")
        });
        if open {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "nothing opened {protocol} port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An ffmpeg CLI process (a stream's server, sender or receiver), killed if the test ends first.
struct Background(std::process::Child);

impl Background {
    fn ffmpeg(args: &[&str]) -> Self {
        let child = Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error", "-y"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ffmpeg runs");
        Background(child)
    }

    /// Waits for it to end (a guard kills it after a minute).
    fn finish(mut self) -> Option<std::process::ExitStatus> {
        wait_or_kill(&mut self.0, Duration::from_secs(60))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The packets of a file's first stream of `kind` ("video", "audio").
fn packets_of(path: &Path, kind: &str) -> Option<u64> {
    packet_counts(path).into_iter().find(|(stream, _)| stream == kind).map(|(_, count)| count)
}

#[test]
fn a_stream_comes_in_and_goes_out_over_rtmp_and_a_server_that_closes_ends_it_cleanly() {
    let dir = TempDir::new().unwrap();
    let input = bunny_stream(dir.path());
    let received = dir.path().join("received.flv");
    let (in_port, out_port) = (free_port(), free_port());
    let in_url = format!("rtmp://127.0.0.1:{in_port}/live/in");
    let out_url = format!("rtmp://127.0.0.1:{out_port}/live/painted");
    // an RTMP server that plays the stream to its first client and then closes the connection, and
    // one that takes a published stream into a file
    let server =
        Background::ffmpeg(&["-i", input.to_str().unwrap(), "-c", "copy", "-f", "flv", "-listen", "1", &in_url]);
    let receiver = Background::ffmpeg(&["-listen", "1", "-i", &out_url, "-c", "copy", received.to_str().unwrap()]);
    wait_for_port("tcp", in_port);
    wait_for_port("tcp", out_port);
    let extra = ["--pace", "every-frame", "--first-iterations", "4"];
    let painter =
        stream_command(&in_url, &out_url, &extra).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (status, run) = output_or_kill(painter);
    assert!(server.finish().is_some() && receiver.finish().is_some(), "the ffmpeg servers ended");
    // FFmpeg reads an RTMP server's close as an I/O error: it is the stream's end, not a failure
    assert!(status.expect("impasto ended").success(), "{}", stderr(&run));

    let summary = &events(&run, "summary")[0];
    let input_pts = frame_timestamps(&input);
    assert_eq!(summary["frames_in"].as_u64(), Some(input_pts.len() as u64), "{summary}");
    assert_eq!(summary["frames_painted"], summary["frames_in"]);
    assert_eq!(summary["broke_off"], Value::Null);
    assert_eq!(summary["connection_closed"], true, "the summary says how it ended");
    // FLV (which RTMP carries) counts milliseconds; MPEG-TS 90 kHz ticks
    let expected: Vec<i64> = from_first(&input_pts).iter().map(|&t| (t as f64 / 90.0).round() as i64).collect();
    let output_pts = from_first(&frame_timestamps(&received));
    assert_eq!(output_pts.len(), expected.len(), "every frame arrived: {output_pts:?}");
    assert!(output_pts.iter().zip(&expected).all(|(got, want)| (got - want).abs() <= 1), "{output_pts:?} {expected:?}");
    assert_eq!(packets_of(&received, "audio"), packets_of(&input, "audio"), "every sound packet");
}

#[test]
fn a_stream_comes_in_and_goes_out_over_srt_every_frame_arriving_and_a_sender_that_closes_ends_it_cleanly() {
    let dir = TempDir::new().unwrap();
    let input = bunny_stream(dir.path());
    let received = dir.path().join("received.ts");
    let (in_port, out_port) = (free_udp_port(), free_udp_port());
    let receiver = Background::ffmpeg(&[
        "-i",
        &format!("srt://127.0.0.1:{out_port}?mode=listener"),
        "-c",
        "copy",
        received.to_str().unwrap(),
    ]);
    wait_for_port("udp", out_port);
    // impasto listens for the sender, and calls the receiver
    let painter = stream_command(
        &format!("srt://127.0.0.1:{in_port}?mode=listener"),
        &format!("srt://127.0.0.1:{out_port}"),
        &["--pace", "every-frame", "--first-iterations", "4"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for_port("udp", in_port);
    // the sender waits for its last packets before it closes (SRT drops unsent ones by default)
    let sender = Background::ffmpeg(&[
        "-i",
        input.to_str().unwrap(),
        "-c",
        "copy",
        "-f",
        "mpegts",
        &format!("srt://127.0.0.1:{in_port}?linger=2"),
    ]);
    let (status, run) = output_or_kill(painter);
    assert!(sender.finish().is_some() && receiver.finish().is_some(), "the ffmpeg ends ended");
    // FFmpeg reads an SRT sender's close as an I/O error: it is the stream's end, not a failure
    let status = status.expect("impasto ended");
    assert!(status.success(), "{}", stderr(&run));

    let summary = &events(&run, "summary")[0];
    let input_pts = frame_timestamps(&input);
    assert_eq!(summary["frames_in"].as_u64(), Some(input_pts.len() as u64), "{summary}");
    assert_eq!(summary["frames_painted"], summary["frames_in"]);
    assert_eq!(summary["connection_closed"], true, "the summary says how it ended");
    // impasto's own SRT output waits for its last packets too, so every painted frame arrives
    assert_eq!(from_first(&frame_timestamps(&received)), from_first(&input_pts), "every frame, at its time");
    assert_eq!(packets_of(&received, "audio"), packets_of(&input, "audio"), "every sound packet");
}

#[test]
fn the_first_ctrl_c_ends_a_stream_whose_input_pipe_has_gone_silent() {
    let dir = TempDir::new().unwrap();
    // six seconds: more than FFmpeg reads ahead to learn a stream's format
    let bytes = std::fs::read(bikes_stream(dir.path(), 150)).unwrap();
    let output = dir.path().join("piped.ts");
    let mut child = stream_command("-", output.to_str().unwrap(), &["--first-iterations", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the whole stream, then a pipe that stays open and silent
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        stdin.write_all(&bytes).unwrap();
        stdin
    });
    let lines = lines_of(child.stdout.take().unwrap());
    let mut printed = Vec::new();
    // live pace paints the newest frame it has; the decoder holds the last few until the stream ends
    while !printed.iter().any(|line: &String| painted_index(line).is_some_and(|index| index >= 140)) {
        let line = lines.recv_timeout(Duration::from_secs(120)).expect("frames near the stream's end are painted");
        printed.push(line);
    }
    // not a measurement: time for the reader to take in the last bytes and wait on the silent pipe
    std::thread::sleep(Duration::from_secs(1));
    let stdin = feeder.join().unwrap();
    // SAFETY: a plain signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    // a guard, not a measurement: a hang fails this test instead of stalling the suite
    let status = wait_or_kill(&mut child, Duration::from_secs(120));
    drop(stdin);
    printed.extend(lines.iter());
    let mut errors = String::new();
    child.stderr.take().unwrap().read_to_string(&mut errors).unwrap();
    let status = status.expect("one Ctrl-C did not end the wait on the silent pipe");
    assert!(status.success(), "{errors}");

    let summary: Value = printed
        .iter()
        .find_map(|l| serde_json::from_str(l).ok().filter(|v: &Value| v["event"] == "summary"))
        .expect("a summary");
    assert_eq!(summary["stopped"], true);
    assert!(summary["frames_in"].as_u64().unwrap() >= 140, "{summary}");
    assert_eq!(frame_timestamps(&output).len() as u64, summary["frames_painted"].as_u64().unwrap());
    assert_eq!(entries(dir.path()), ["bikes.ts", "piped.ts"]);
}

/// Whether process `pid` has `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    let Ok(descriptors) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    descriptors.filter_map(Result::ok).any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
}

#[test]
fn a_named_pipe_is_read_when_its_writer_comes_and_one_ctrl_c_ends_the_wait_for_one() {
    let dir = TempDir::new().unwrap();
    let bytes = std::fs::read(bikes_stream(dir.path(), 30)).unwrap();
    let fifo = dir.path().join("in.fifo");
    let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string naming a path in a fresh directory.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    let output = dir.path().join("painted.ts");
    let extra = ["--first-iterations", "2", "--pace", "every-frame"];

    // no writer: impasto opens the pipe at once (open(2) of a FIFO would wait in the kernel for a
    // writer, where no signal ends it) and the first Ctrl-C ends the wait
    let mut child = stream_command(fifo.to_str().unwrap(), output.to_str().unwrap(), &extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = std::time::Instant::now() + Duration::from_secs(120);
    while !has_open(child.id(), &fifo) && std::time::Instant::now() < guard {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a plain signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_or_kill(&mut child, Duration::from_secs(120));
    let mut errors = String::new();
    child.stderr.take().unwrap().read_to_string(&mut errors).unwrap();
    assert!(status.expect("one Ctrl-C did not end the wait for a writer").code() == Some(1), "{errors}");
    assert!(errors.contains("in.fifo") && errors.contains("stopped before the stream began"), "{errors}");
    assert_eq!(entries(dir.path()), ["bikes.ts", "in.fifo"]);

    // a writer that comes later: every frame painted
    let child = stream_command(fifo.to_str().unwrap(), output.to_str().unwrap(), &extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(&fifo, &bytes).unwrap();
    let (status, run) = output_or_kill(child);
    assert!(status.expect("the stream ended").success(), "{}", stderr(&run));
    let summary = &events(&run, "summary")[0];
    assert_eq!((summary["frames_in"].as_u64(), summary["frames_painted"].as_u64()), (Some(30), Some(30)), "{summary}");
    assert_eq!(frame_timestamps(&output).len(), 30);
}

#[test]
fn a_second_signal_gives_up_sending_to_a_pipe_no_one_reads() {
    let dir = TempDir::new().unwrap();
    let input = bikes_stream(dir.path(), 20);
    // standard output: a pipe of one page, already full, whose reader never reads
    let (reader, mut writer) = std::io::pipe().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&writer);
    // SAFETY: plain fcntl calls on a descriptor this test holds.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, 4096);
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        while writer.write(&[0u8; 512]).is_ok() {}
        libc::fcntl(fd, libc::F_SETFL, flags);
    }
    let mut child = stream_command(input.to_str().unwrap(), "-", &["--first-iterations", "2", "--pace", "every-frame"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the frames' lines go to standard error when the stream goes to standard output
    let lines = lines_of(child.stderr.take().unwrap());
    let mut painted = 0;
    while painted < 3 {
        // the third: the writer has been stuck on its first packet for two frames' painting
        let line = lines.recv_timeout(Duration::from_secs(120)).expect("three frames are painted");
        painted += usize::from(painted_index(&line).is_some());
    }
    // SAFETY: plain signals to our own child process; two kinds, so that neither is merged away.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = wait_or_kill(&mut child, Duration::from_secs(120));
    let errors: Vec<String> = lines.iter().collect();
    drop(reader);
    let status = status.expect("two signals did not end a send to a pipe no one reads");
    assert!(!status.success(), "a stream given up is an error");
    assert!(errors.iter().any(|line| line.contains("pipe:1")), "the error names the output: {errors:?}");
}

#[test]
fn a_live_hls_playlist_is_written_in_place_as_the_stream_goes_and_continued_by_a_restart() {
    let dir = TempDir::new().unwrap();
    // six seconds of stream (three two-second segments), then a connection that stays open and silent
    let bytes = std::fs::read(bikes_stream(dir.path(), 150)).unwrap();
    let input = TcpListener::bind("127.0.0.1:0").unwrap();
    let input_url = format!("tcp://127.0.0.1:{}", input.local_addr().unwrap().port());
    let (release, released) = std::sync::mpsc::channel::<()>();
    let sender = std::thread::spawn(move || {
        let (mut client, _) = input.accept().unwrap();
        let _ = client.write_all(&bytes);
        let _ = released.recv();
    });
    let hls = dir.path().join("hls");
    std::fs::create_dir(&hls).unwrap();
    let playlist = hls.join("live.m3u8");
    let extra = ["--first-iterations", "2", "--pace", "every-frame"];
    let mut child = stream_command(&input_url, playlist.to_str().unwrap(), &extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(child.stdout.take().unwrap());
    // frame 100 is painted once 4 s of stream have been encoded: two-second segments (a key frame
    // every two seconds) are complete
    loop {
        let line = lines.recv_timeout(Duration::from_secs(120)).expect("frame 100 is painted");
        if painted_index(&line) == Some(100) {
            break;
        }
    }

    // while the stream runs: the playlist is there under its own name, open-ended, with its segments
    let live = std::fs::read_to_string(&playlist).expect("the playlist is written as the stream goes");
    assert!(!live.contains("#EXT-X-ENDLIST"), "{live}");
    let segments: Vec<&str> = live.lines().filter(|line| line.ends_with(".ts")).collect();
    assert!(!segments.is_empty() && segments.iter().all(|s| hls.join(s).is_file()), "{live}");

    // SAFETY: a plain signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_or_kill(&mut child, Duration::from_secs(120));
    release.send(()).unwrap();
    sender.join().unwrap();
    let mut errors = String::new();
    child.stderr.take().unwrap().read_to_string(&mut errors).unwrap();
    assert!(status.expect("the stream ended").success(), "{errors}");
    let ended = std::fs::read_to_string(&playlist).unwrap();
    assert!(ended.contains("#EXT-X-ENDLIST"), "the playlist is closed when the stream ends: {ended}");
    assert!(entries(&hls).iter().all(|name| name == "live.m3u8" || name.starts_with("live")), "{:?}", entries(&hls));

    // a stream restarted into the same playlist continues it: numbering goes on, a discontinuity
    // marks the restart, and every segment listed is there
    let first_run = segment_numbers(&ended);
    let restart = dir.path().join("restart");
    std::fs::create_dir(&restart).unwrap();
    let restart_input = bikes_stream(&restart, 60);
    let restarted = stream_command(restart_input.to_str().unwrap(), playlist.to_str().unwrap(), &extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, output) = output_or_kill(restarted);
    assert!(status.expect("the restarted stream ended").success(), "{}", stderr(&output));
    let continued = std::fs::read_to_string(&playlist).unwrap();
    let numbers = segment_numbers(&continued);
    let last_before = *first_run.iter().max().unwrap();
    let new: Vec<u64> = numbers.iter().copied().filter(|&n| n > last_before).collect();
    assert!(!new.is_empty() && numbers.windows(2).all(|pair| pair[0] < pair[1]), "{ended}\n→\n{continued}");
    let lines: Vec<&str> = continued.lines().collect();
    let restart_at = lines.iter().position(|line| *line == format!("live-{}.ts", new[0])).unwrap();
    assert!(restart_at >= 2 && lines[restart_at - 1].starts_with("#EXTINF"), "{continued}");
    assert_eq!(lines[restart_at - 2], "#EXT-X-DISCONTINUITY", "the restart is marked: {continued}");
    assert_eq!(continued.matches("#EXT-X-DISCONTINUITY").count(), 1, "{continued}");
    assert!(continued.contains("#EXT-X-ENDLIST"), "{continued}");
    assert!(numbers.iter().all(|n| hls.join(format!("live-{n}.ts")).is_file()), "{continued}: {:?}", entries(&hls));
}

/// The numbers of the `live-N.ts` segments a playlist lists, in its order.
fn segment_numbers(playlist: &str) -> Vec<u64> {
    playlist.lines().filter_map(|line| line.strip_prefix("live-")?.strip_suffix(".ts")?.parse().ok()).collect()
}
