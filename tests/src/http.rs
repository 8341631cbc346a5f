//! A tiny HTTP/1.1 client for the node's plain HTTP endpoints (`/healthz`,
//! `/metrics`, the operator's `/admin/...`): one request per connection with
//! `Connection: close`, read to EOF, under a timeout. Enough for tests; no
//! dependency on an HTTP crate.

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
    request(addr, "GET", path, &[], b"", timeout).await
}

/// Sends `method path` with extra `headers` and `body` (a `Content-Length`
/// is added) to `addr` (127.0.0.1 only) and reads the response, within
/// `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse> {
    tokio::time::timeout(timeout, request_inner(addr, method, path, headers, body))
        .await
        .with_context(|| format!("{method} {path} on {addr} timed out after {timeout:?}"))?
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE_BYTES {
            bail!("response to {method} {path} larger than {MAX_RESPONSE_BYTES} bytes");
        }
    }
    parse(&buf).with_context(|| format!("parse response to {method} {path}"))
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

/// The value of the Prometheus sample `name` in the exposition `text`,
/// summed over its label sets; `None` when no sample has that name.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    metric_value_with(text, name, "")
}

/// Like [`metric_value`], counting only the series whose labels contain
/// `label` (e.g. `code="INTERNAL"`).
pub fn metric_value_with(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let series_name = series.split('{').next().unwrap_or("").trim();
        if series_name != name || !series.contains(label) {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

#[cfg(test)]
mod tests;
