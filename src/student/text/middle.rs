//! Where a fill-in-the-middle completion ends when the model does not end it itself: small
//! models often write the middle and then carry on into code that belongs after the cursor.
//! As llama.cpp's `n_indent` does, a line that starts left of the cursor line's indentation
//! ends the middle (the enclosing block is over); so does a line that repeats the first line
//! of the suffix. Text is held a line at a time until it is known to belong, and blank
//! lines until a line that belongs follows them (the suffix brings its own).

use super::stop::StopScan;

/// Watches a fill-in-the-middle completion line by line.
pub struct MiddleGuard {
    /// Columns of indentation a line needs to still belong to the middle.
    indent: usize,
    /// The suffix's first non-blank line (indentation kept, when it has a word in it):
    /// writing it again means the middle is done.
    suffix_line: Option<String>,
    /// Text of the line being written.
    line: String,
    /// Blank lines held until a line that belongs follows them.
    blank: String,
    /// Whether the completion is past its first line (the cursor's own).
    past_first_line: bool,
}

impl MiddleGuard {
    /// A guard for a completion at the end of `before` (the code before the cursor) with
    /// `suffix` after it; `indent` overrides the cursor line's indentation.
    pub fn new(before: &str, suffix: &str, indent: Option<usize>) -> Self {
        let cursor_line = before.rsplit('\n').next().unwrap_or("");
        let indent = indent.unwrap_or_else(|| columns(cursor_line));
        // Only a line with some word in it: a closing bracket repeats at every level.
        let suffix_line = suffix
            .lines()
            .find(|l| !l.trim().is_empty())
            .filter(|l| l.chars().any(char::is_alphanumeric))
            .map(|l| l.trim_end().to_string());
        Self {
            indent,
            suffix_line,
            line: String::new(),
            blank: String::new(),
            past_first_line: false,
        }
    }

    /// Takes new text; says what may be sent, or that the middle has ended.
    pub fn push(&mut self, text: &str) -> StopScan {
        let mut emit = String::new();
        for piece in text.split_inclusive('\n') {
            self.line.push_str(piece);
            if !self.line.ends_with('\n') {
                break;
            }
            if self.ends_middle(&self.line) {
                self.line.clear();
                return StopScan::Stopped(emit);
            }
            if self.past_first_line && self.line.trim().is_empty() {
                self.blank.push_str(&self.line);
            } else {
                emit.push_str(&self.blank);
                emit.push_str(&self.line);
                self.blank.clear();
            }
            self.line.clear();
            self.past_first_line = true;
        }
        if self.past_first_line && self.ends_middle(&self.line) {
            self.line.clear();
            return StopScan::Stopped(emit);
        }
        StopScan::Emit(emit)
    }

    /// The line still held when generation ends (trailing blank lines are dropped).
    pub fn finish(&mut self) -> String {
        if self.line.trim().is_empty() {
            return String::new();
        }
        std::mem::take(&mut self.blank) + &std::mem::take(&mut self.line)
    }

    /// Whether `line` (complete, or begun) belongs after the middle.
    fn ends_middle(&self, line: &str) -> bool {
        if !self.past_first_line {
            return false;
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return false;
        }
        let dedented = self.indent > 0 && columns(line) < self.indent;
        let repeats_suffix =
            line.ends_with('\n') && self.suffix_line.as_deref() == Some(line.trim_end());
        dedented || repeats_suffix
    }
}

/// Columns of leading whitespace (a tab counts as one, as llama.cpp counts it).
fn columns(line: &str) -> usize {
    line.chars().take_while(|c| *c == ' ' || *c == '\t').count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(guard: &mut MiddleGuard, pieces: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in pieces {
            match guard.push(p) {
                StopScan::Emit(t) => out.push_str(&t),
                StopScan::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&guard.finish());
        (out, false)
    }

    #[test]
    fn a_line_left_of_the_block_ends_the_middle() {
        let mut g = MiddleGuard::new("def add(a, b):\n    ", "\n\nprint(add(2, 3))\n", None);
        let (text, stopped) = run(
            &mut g,
            &["return", " a + b\n", "\n", "print(add(5,", " 7))\n"],
        );
        assert!(stopped);
        assert_eq!(text, "return a + b\n");
    }

    #[test]
    fn repeating_the_suffix_ends_the_middle() {
        let mut g = MiddleGuard::new("x = 1\n", "y = 2\n", None);
        let (text, stopped) = run(&mut g, &["z = 3\n", "y = 2\n", "w = 4\n"]);
        assert!(stopped);
        assert_eq!(text, "z = 3\n");
    }

    #[test]
    fn lines_inside_the_block_pass_and_the_last_is_kept() {
        let mut g = MiddleGuard::new("    if x:\n        ", "", Some(4));
        let (text, stopped) = run(&mut g, &["a()\n", "\n", "    b()\n", "        c"]);
        assert!(!stopped);
        assert_eq!(text, "a()\n\n    b()\n        c");
    }

    #[test]
    fn a_closing_bracket_is_not_the_suffix_repeated() {
        let mut g = MiddleGuard::new("fn f() {\n    ", "}\n", None);
        let (text, stopped) = run(&mut g, &["if x {\n", "        y();\n", "    }\n"]);
        assert!(!stopped);
        assert_eq!(text, "if x {\n        y();\n    }\n");
    }
}
