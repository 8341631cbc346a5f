//! A tiny HTTP/1.1 client for the node's plain HTTP endpoints (`/healthz`,
//! `/metrics`): one GET per connection with `Connection: close`, read to EOF,
//! under a timeout. Enough for tests; no dependency on an HTTP crate.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response body the helper reads (bounded memory in tests too).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Raw header lines (without the status line).
    pub headers: Vec<String>,
    /// The body as text (lossy UTF-8), de-chunked if needed.
    pub body: String,
}

/// GETs `path` from `addr` (127.0.0.1 only) within `timeout`.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    tokio::time::timeout(timeout, get_inner(addr, path))
        .await
        .with_context(|| format!("GET {path} timed out after {timeout:?}"))?
}

async fn get_inner(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE_BYTES {
            bail!("response to GET {path} larger than {MAX_RESPONSE_BYTES} bytes");
        }
    }
    parse(&buf).with_context(|| format!("parse response to GET {path}"))
}

fn parse(buf: &[u8]) -> Result<HttpResponse> {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let raw_body = &buf[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("no status line")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()
        .context("bad status code")?;
    let headers: Vec<String> = lines.map(str::to_string).collect();
    let chunked = headers.iter().any(|h| {
        let h = h.to_ascii_lowercase();
        h.starts_with("transfer-encoding:") && h.contains("chunked")
    });
    let body = if chunked {
        dechunk(raw_body)?
    } else {
        raw_body.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    })
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    // Each chunk is at least one byte of input, so this loop is bounded.
    while !raw.is_empty() {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size_text = String::from_utf8_lossy(&raw[..eol]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size_text:?}"))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            break;
        }
        if raw.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or(&[]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
