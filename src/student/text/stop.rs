//! Stop sequences: text is released only once it can no longer be the start of a stop
//! string, so a stop that spans several tokens is caught and never reaches the client.

/// What the matcher makes of newly generated text.
#[derive(Debug, PartialEq)]
pub enum StopScan {
    /// Text safe to send now (may be empty while a possible stop is held back).
    Emit(String),
    /// A stop sequence was found: send this text (what preceded it) and finish.
    Stopped(String),
}

impl StopScan {
    /// The text, and whether generation is to stop.
    pub fn into_parts(self) -> (String, bool) {
        match self {
            Self::Emit(t) => (t, false),
            Self::Stopped(t) => (t, true),
        }
    }
}

/// Holds back the tail of the output that might begin a stop sequence.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopScan {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return StopScan::Emit(std::mem::take(&mut self.held));
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(at);
            return StopScan::Stopped(std::mem::take(&mut self.held));
        }
        // Keep the longest suffix of `held` that is a proper prefix of some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(keep_from);
        StopScan::Emit(std::mem::replace(&mut self.held, rest))
    }

    /// Text still held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopScan::Emit(t) => out.push_str(&t),
                StopScan::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_inside_one_token() {
        assert_eq!(
            run(&["END"], &["abc", "xENDy", "more"]),
            ("abcx".into(), true)
        );
    }

    #[test]
    fn stop_spanning_tokens_never_leaks() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into()]);
        assert_eq!(m.push("Hi there."), StopScan::Emit("Hi there.".into()));
        assert_eq!(m.push("\n"), StopScan::Emit("".into()));
        assert_eq!(m.push("\nUs"), StopScan::Emit("".into()));
        assert_eq!(m.push("er: x"), StopScan::Stopped("".into()));
    }

    #[test]
    fn false_start_is_released() {
        assert_eq!(run(&["abc"], &["xa", "b", "d"]), ("xabd".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(
            run(&["two", "one"], &["zero one two"]),
            ("zero ".into(), true)
        );
    }

    #[test]
    fn multibyte_stop_sequences() {
        assert_eq!(run(&["。"], &["你好", "。再见"]), ("你好".into(), true));
    }
}
