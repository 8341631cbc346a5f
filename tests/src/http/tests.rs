//! Unit tests of the tiny HTTP response parser.

use super::*;

#[test]
fn parses_a_plain_response() {
    let r = parse(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
        .expect("parses");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "ok");
    assert_eq!(
        r.headers,
        vec!["content-type: text/plain", "content-length: 2"]
    );
}

#[test]
fn dechunks_a_chunked_body() {
    let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nchat\r\n6;ext=1\r\n_total\r\n0\r\n\r\n";
    let r = parse(raw).expect("parses");
    assert_eq!(r.body, "chat_total");
}

#[test]
fn rejects_garbage() {
    assert!(parse(b"not http at all").is_err());
    assert!(parse(b"HTTP/1.1 abc\r\n\r\n").is_err());
    assert!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nshort").is_err());
}

#[test]
fn reads_metric_values() {
    let text = "# HELP chat_x_total X.\n# TYPE chat_x_total counter\nchat_x_total 12\n\
                chat_x_total_other 7\nchat_errors_total{code=\"A\"} 2\nchat_errors_total{code=\"B\"} 3\n";
    assert_eq!(metric_value(text, "chat_x_total"), Some(12.0));
    assert_eq!(metric_value(text, "chat_errors_total"), Some(5.0));
    assert_eq!(metric_value(text, "chat_missing"), None);
    assert_eq!(
        metric_value_with(text, "chat_errors_total", "code=\"B\""),
        Some(3.0)
    );
    assert_eq!(
        metric_value_with(text, "chat_errors_total", "code=\"C\""),
        None
    );
}
