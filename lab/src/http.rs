//! A minimal blocking HTTP/1.0 client: how `portcullis stats`, `conntrack`, `explain --admin`
//! and the lab read a running gateway's endpoints, over TCP or its admin unix socket. One request
//! per connection, bounded by a timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a running gateway's admin API is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The admin unix socket (admin.socket).
    Unix(PathBuf),
    /// The admin API over TCP (admin.listen), with its bearer token.
    Tcp(SocketAddr, Option<String>),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a, _) => write!(f, "{a}"),
        }
    }
}

impl Endpoint {
    /// Sends `method path` (no body): returns (status code, body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        timeout: Duration,
    ) -> std::io::Result<(u16, String)> {
        match self {
            Endpoint::Unix(sock) => request_unix(method, sock, path, timeout),
            Endpoint::Tcp(addr, token) => {
                let mut s = TcpStream::connect_timeout(addr, timeout)?;
                exchange(
                    &mut s,
                    method,
                    &addr.to_string(),
                    path,
                    token.as_deref(),
                    timeout,
                )
            }
        }
    }
}

impl Endpoint {
    /// Sends `GET path` and returns the status code and a reader of the body as it streams
    /// (`/monitor`); the body ends when the server closes.
    pub fn stream(&self, path: &str) -> std::io::Result<(u16, Box<dyn std::io::BufRead + Send>)> {
        use std::io::BufRead;
        let (mut r, host, token): (Box<dyn ReadWrite>, String, Option<&str>) = match self {
            Endpoint::Unix(sock) => (
                Box::new(UnixStream::connect(sock)?),
                "localhost".into(),
                None,
            ),
            Endpoint::Tcp(addr, token) => (
                Box::new(TcpStream::connect_timeout(addr, Duration::from_secs(3))?),
                addr.to_string(),
                token.as_deref(),
            ),
        };
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        r.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n").as_bytes())?;
        let mut reader = std::io::BufReader::new(ReadHalf(r));
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
        }
        Ok((code, Box::new(reader)))
    }
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

struct ReadHalf(Box<dyn ReadWrite>);

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

/// Sends `method path` over the unix socket `sock`.
pub fn request_unix(
    method: &str,
    sock: &Path,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    exchange(&mut s, method, "localhost", path, None, timeout)
}

fn exchange<S: Read + Write>(
    s: &mut S,
    method: &str,
    host: &str,
    path: &str,
    token: Option<&str>,
    _timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    // One write: a server that reads the head in one go must see all of it.
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\n{auth}Content-Length: 0\r\n\r\n")
            .as_bytes(),
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

/// GETs `path` from `addr`: returns (status code, body).
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    request("GET", addr, path, timeout)
}

/// Sends `method path` (no body) to `addr`: returns (status code, body).
pub fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    exchange(&mut s, method, &addr.to_string(), path, None, timeout)
}
