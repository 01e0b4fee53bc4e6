//! The CLI's HTTP client for the agent's admin endpoint (127.0.0.1:15000 by default): a GET
//! that returns the JSON answer, with errors that say what to check.

use std::io::{Read, Write};
use std::net::SocketAddr;

use serde_json::Value;

/// Failures asking the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The admin endpoint did not answer.
    #[error("cannot reach the agent's admin endpoint at {addr}: is the agent running (inside this network namespace)? use --admin-address or --file")]
    Admin {
        /// Address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered, but not with 200.
    #[error("the agent at {addr} refused GET {path}: {answer}")]
    Refused {
        /// Address.
        addr: SocketAddr,
        /// What was asked.
        path: String,
        /// Its status and body.
        answer: String,
    },
    /// The answer was not JSON.
    #[error("the answer of {addr} to GET {path} is not JSON")]
    NotJson {
        /// Address.
        addr: SocketAddr,
        /// What was asked.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// GETs `path` (JSON) from a running agent's admin endpoint.
pub fn fetch_json(addr: SocketAddr, path: &str) -> Result<Value, Error> {
    let body = fetch_text(addr, path)?;
    serde_json::from_str(&body).map_err(|source| Error::NotJson {
        addr,
        path: path.to_string(),
        source,
    })
}

/// GETs `path` from a running agent's HTTP endpoint (admin or metrics); the body.
pub fn fetch_text(addr: SocketAddr, path: &str) -> Result<String, Error> {
    let err = |source| Error::Admin { addr, source };
    let mut stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .map_err(err)?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(err)?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .map_err(err)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(err)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        return Err(Error::Refused {
            addr,
            path: path.to_string(),
            answer: format!("{status} {}", body.trim()),
        });
    }
    Ok(body.to_string())
}
