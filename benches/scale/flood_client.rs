//! A lean flood of requests at a fixed rate: the unknown-key flood of benches/scale/run.py.
//!
//!     flood_client --url http://127.0.0.1:8080/v1/chat/completions --keys-file keys.txt \
//!                  --rate 10000 [--connections 32] [--duration-s 5] [--expect-status 401]
//!
//! Raw HTTP/1.1 on keep-alive connections, at most one request in flight on each, the keys in
//! turn; prints `{"all", "expected", "errors", "rps"}` (`rps`: answers with the expected status
//! per second).
//!
//! Why not the load client: the flood shares this machine's two cores with the gateway it
//! measures, and a client woken once per answer (the load client; a first version of this one
//! on tokio too) costs 19-23 µs of CPU per request, as much as the gateway's own 401. This one
//! wakes once a millisecond, reads the answers that came meanwhile and sends the requests due
//! by then (ten at 10,000 a second): a write and a read per request, 9-10 µs.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio::time::Instant;

/// How long answers still in flight are waited for after the last request.
const GRACE: Duration = Duration::from_secs(2);

struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
    in_flight: bool,
}

/// What the flood saw.
#[derive(Default)]
struct Tally {
    all: u64,
    expected: u64,
    errors: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut url, mut keys_file) = (String::new(), String::new());
    let (mut rate, mut connections, mut duration_s, mut expect) = (1000f64, 32usize, 5f64, 401u16);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = value,
            "--keys-file" => keys_file = value,
            "--rate" => rate = value.parse()?,
            "--connections" => connections = value.parse()?,
            "--duration-s" => duration_s = value.parse()?,
            "--expect-status" => expect = value.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let rest = url.strip_prefix("http://").ok_or("--url must be http://HOST:PORT/PATH")?;
    let (authority, path) = rest.split_once('/').ok_or("--url needs a path")?;
    let addr: SocketAddr = authority.parse()?;
    let body = r#"{"model":"auto","messages":[{"role":"user","content":"Say something short about proxies."}],"max_tokens":32}"#;
    let requests: Vec<Vec<u8>> = std::fs::read_to_string(&keys_file)?
        .lines()
        .filter(|line| !line.is_empty())
        .map(|key| {
            format!(
                "POST /{path} HTTP/1.1\r\nhost: {authority}\r\nauthorization: Bearer {key}\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
        .collect();
    if requests.is_empty() {
        return Err("--keys-file has no keys".into());
    }

    let mut pool: Vec<Option<Connection>> = (0..connections).map(|_| None).collect();
    let mut tally = Tally::default();
    let (started, duration) = (Instant::now(), Duration::from_secs_f64(duration_s));
    let mut sent = 0u64;
    loop {
        for slot in pool.iter_mut() {
            let Some(connection) = slot else { continue };
            match connection.answer() {
                Ok(Some(status)) => {
                    tally.all += 1;
                    tally.expected += u64::from(status == expect);
                }
                Ok(None) => {}
                Err(_) => {
                    tally.errors += 1;
                    *slot = None;
                }
            }
        }
        let elapsed = started.elapsed();
        if elapsed >= duration {
            let waiting = pool.iter().flatten().any(|c| c.in_flight);
            if !waiting || elapsed >= duration + GRACE {
                break;
            }
        } else {
            let due = (rate * elapsed.as_secs_f64()) as u64;
            for slot in pool.iter_mut() {
                if sent >= due {
                    break;
                }
                if slot.is_none() {
                    *slot = Connection::open(addr).ok();
                }
                let Some(connection) = slot else {
                    tally.errors += 1;
                    continue;
                };
                if connection.in_flight {
                    continue;
                }
                let request = &requests[usize::try_from(sent).unwrap_or(0) % requests.len()];
                if connection.stream.write_all(request).is_err() {
                    tally.errors += 1;
                    *slot = None;
                    continue;
                }
                connection.in_flight = true;
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!(
        r#"{{"all":{},"expected":{},"errors":{},"rps":{:.3}}}"#,
        tally.all,
        tally.expected,
        tally.errors,
        tally.expected as f64 / duration_s
    );
    Ok(())
}

impl Connection {
    fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Ok(Self { stream, buffer: Vec::with_capacity(4096), in_flight: false })
    }

    /// The status of the answer in flight, if all of it has come (it must carry a
    /// `content-length`); an error when the connection broke.
    fn answer(&mut self) -> std::io::Result<Option<u16>> {
        if !self.in_flight {
            return Ok(None);
        }
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(read) => self.buffer.extend_from_slice(&chunk[..read]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let Some(end) = memchr::memmem::find(&self.buffer, b"\r\n\r\n") else { return Ok(None) };
        let length = content_length(&self.buffer[..end]).ok_or(ErrorKind::InvalidData)?;
        if self.buffer.len() < end + 4 + length {
            return Ok(None);
        }
        let status = std::str::from_utf8(self.buffer.get(9..12).unwrap_or_default())
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(ErrorKind::InvalidData)?;
        self.buffer.drain(..end + 4 + length);
        self.in_flight = false;
        Ok(Some(status))
    }
}

fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
    })
}
