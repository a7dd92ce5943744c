//! A Hugging Face hub on 127.0.0.1 that serves one directory as a repository's files,
//! answering the `resolve` requests hf-hub makes (a one-byte ranged GET for the file's etag,
//! commit and size, then the ranged download), and counting them.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The commit every file is said to be at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A running fake hub; it stops answering when dropped.
pub struct FakeHub {
    pub url: String,
    requests: Arc<AtomicUsize>,
    stopped: Arc<AtomicBool>,
}

impl FakeHub {
    /// Serves the files of `dir` as those of every repository.
    pub fn serve(dir: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let (dir, counted, stop) = (dir.to_path_buf(), requests.clone(), stopped.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if stop.load(Ordering::Relaxed) {
                    continue; // dropped: the hub is unreachable from now on
                }
                counted.fetch_add(1, Ordering::Relaxed);
                let dir = dir.clone();
                std::thread::spawn(move || answer(stream, &dir));
            }
        });
        Self {
            url,
            requests,
            stopped,
        }
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

fn answer(stream: TcpStream, dir: &Path) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut range_start = 0u64;
    let mut range_end = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(range) = lower.strip_prefix("range: bytes=") {
            let (start, end) = range.trim().split_once('-').unwrap();
            range_start = start.parse().unwrap();
            range_end = end.parse::<u64>().ok();
        }
    }
    // GET /{owner}/{repo}/resolve/{revision}/{file} HTTP/1.1
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let file: Option<PathBuf> = path
        .splitn(6, '/')
        .nth(5)
        .map(|name| dir.join(name))
        .filter(|p| p.is_file());
    let mut stream = stream;
    let Some(file) = file else {
        let _ = write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nx-error-code: EntryNotFound\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    };
    let size = std::fs::metadata(&file).unwrap().len();
    let end = range_end.unwrap_or(size - 1).min(size - 1);
    let length = end + 1 - range_start;
    let etag: String = file
        .file_name()
        .unwrap()
        .to_string_lossy()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {length}\r\n\
         Content-Range: bytes {range_start}-{end}/{size}\r\nETag: \"{etag}\"\r\n\
         x-repo-commit: {COMMIT}\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut source = std::fs::File::open(&file).unwrap();
    source.seek(SeekFrom::Start(range_start)).unwrap();
    let _ = std::io::copy(&mut source.take(length), &mut stream);
}
