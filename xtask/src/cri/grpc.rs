//! Unary gRPC calls over HTTP/2 on a unix socket: what the kubelet speaks
//! to the runtime's CRI socket, reduced to the calls the CRI test makes.
//! A request is one message framed as gRPC frames it (a zero byte, no
//! compression; the length as a big-endian u32; the protobuf), POSTed to
//! `/SERVICE/METHOD`; the answer is one message the same way, and the
//! outcome is the `grpc-status` trailer (or header, for an answer without
//! a body).
//! https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use tokio::{net::UnixStream, runtime::Runtime};

/// A call that takes longer failed (the runtime's slowest call here is a
/// pod's start: a few seconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Client {
    socket: PathBuf,
    runtime: Runtime,
}

impl Client {
    pub fn new(socket: PathBuf) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self { socket, runtime })
    }

    /// Calls `path` (`/runtime.v1.RuntimeService/RunPodSandbox`) with the
    /// protobuf `request`; returns the answer's protobuf.
    pub fn call(&self, path: &str, request: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.runtime
            .block_on(async {
                tokio::time::timeout(CALL_TIMEOUT, self.exchange(path, request)).await
            })
            .with_context(|| format!("{path}: no answer within {CALL_TIMEOUT:?}"))?
            .with_context(|| path.to_string())
    }

    async fn exchange(&self, path: &str, request: &[u8]) -> anyhow::Result<Vec<u8>> {
        let io = UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("connecting to {}", self.socket.display()))?;
        let (client, connection) = h2::client::handshake(io).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await?;
        let head = http::Request::post(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (answer, mut send) = client.send_request(head, false)?;
        let mut framed = Vec::with_capacity(5 + request.len());
        framed.push(0);
        framed.extend_from_slice(&(request.len() as u32).to_be_bytes());
        framed.extend_from_slice(request);
        send.send_data(Bytes::from(framed), true)?;
        let (head, mut body) = answer.await?.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await?;
        let field = |name: &str| {
            trailers
                .as_ref()
                .and_then(|t| t.get(name))
                .or_else(|| head.headers.get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = field("grpc-status").context("no grpc-status in the answer")?;
        if status != "0" {
            bail!(
                "gRPC status {status}: {}",
                field("grpc-message")
                    .map(|m| percent_decoded(&m))
                    .unwrap_or_default()
            );
        }
        ensure!(
            data.len() >= 5 && data[0] == 0,
            "answer of {} bytes is not one uncompressed gRPC message",
            data.len()
        );
        let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
        ensure!(
            data.len() == 5 + len,
            "answer length {len} != {}",
            data.len() - 5
        );
        Ok(data.split_off(5))
    }
}

/// `grpc-message` is percent-encoded.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(
            super::percent_decoded("NRI%20RunPodSandbox%20failed%3A x%"),
            "NRI RunPodSandbox failed: x%"
        );
    }
}
