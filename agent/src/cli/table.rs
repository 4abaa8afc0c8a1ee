//! Aligned text tables for the CLI: columns padded to their widest cell, two spaces apart, the
//! last one unpadded; colour only when the caller asks for it (stdout is a terminal and
//! `NO_COLOR` is unset), applied after padding so that it never shifts a column. Pure.

use std::io::IsTerminal;

/// The few colours the tables use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Colour {
    Green,
    Yellow,
    Magenta,
    Red,
    Bold,
    Dim,
}

impl Colour {
    fn code(self) -> &'static str {
        match self {
            Colour::Green => "32",
            Colour::Yellow => "33",
            Colour::Magenta => "35",
            Colour::Red => "31",
            Colour::Bold => "1",
            Colour::Dim => "2",
        }
    }
}

/// One cell: its text and, on a terminal, its colour.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cell {
    pub text: String,
    pub colour: Option<Colour>,
}

impl Cell {
    pub fn new(text: impl Into<String>, colour: Option<Colour>) -> Cell {
        Cell { text: text.into(), colour }
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Cell {
        Cell { text, colour: None }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Cell {
        Cell { text: text.to_owned(), colour: None }
    }
}

/// Whether standard output wants colour: a terminal, and `NO_COLOR` unset (no-color.org).
pub fn colour_wanted() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The lines of a table with an optional header row.
pub fn render(header: Option<&[&str]>, rows: &[Vec<Cell>], colour: bool) -> Vec<String> {
    let head: Option<Vec<Cell>> =
        header.map(|h| h.iter().map(|t| Cell::new(*t, Some(Colour::Bold))).collect());
    let all: Vec<&Vec<Cell>> = head.iter().chain(rows.iter()).collect();
    let columns = all.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for row in &all {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.text.chars().count());
        }
    }
    all.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, c) in row.iter().enumerate() {
                let last = i + 1 == row.len();
                let pad = if last { 0 } else { widths[i] - c.text.chars().count() };
                match c.colour.filter(|_| colour && !c.text.is_empty()) {
                    Some(k) => line.push_str(&format!("\x1b[{}m{}\x1b[0m", k.code(), c.text)),
                    None => line.push_str(&c.text),
                }
                if !last {
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            line.trim_end().to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_colour_does_not_shift_them() {
        let rows = vec![
            vec![Cell::from("a"), Cell::new("fastdp", Some(Colour::Green)), Cell::from("x")],
            vec![Cell::from("longer"), Cell::from("sleeve"), Cell::from("")],
        ];
        let plain = render(Some(&["PEER", "LINK", "NOTE"]), &rows, false);
        assert_eq!(plain, vec!["PEER    LINK    NOTE", "a       fastdp  x", "longer  sleeve"]);
        let coloured = render(Some(&["PEER", "LINK", "NOTE"]), &rows, true);
        assert_eq!(coloured[1], "a       \x1b[32mfastdp\x1b[0m  x");
        let strip =
            |s: &str| s.replace("\x1b[32m", "").replace("\x1b[1m", "").replace("\x1b[0m", "");
        assert_eq!(coloured.iter().map(|l| strip(l)).collect::<Vec<_>>(), plain);
    }
}
