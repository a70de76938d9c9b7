//! Plain-text tables: columns as wide as their widest cell, two spaces apart, the last one
//! left ragged. JSON values are printed as text first: `serde_json::Value`'s `Display`
//! ignores width and alignment.

use std::fmt::Write as _;

/// `header` and `rows` as lines; columns named in `right` are right-aligned (numbers).
pub fn render(header: &[&str], rows: &[Vec<String>], right: &[&str]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let last = header.len().saturating_sub(1);
    let mut text = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for (n, row) in std::iter::once(&header).chain(rows).enumerate() {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let title = header.get(i).map_or("", String::as_str);
            if i == last {
                line.push_str(cell);
            } else if n > 0 && right.contains(&title) {
                let _ = write!(line, "{cell:>w$}  ");
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// A JSON value as a table cell: strings without quotes, null as `-`.
pub fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell() {
        let rows = vec![
            vec!["7".to_owned(), "a-long-name".to_owned(), "x".to_owned()],
            vec!["12345".to_owned(), "b".to_owned(), "y z".to_owned()],
        ];
        assert_eq!(
            render(&["PID", "NAME", "NOTE"], &rows, &["PID"]),
            "PID    NAME         NOTE\n    7  a-long-name  x\n12345  b            y z\n"
        );
        assert_eq!(cell(&serde_json::json!("s")), "s");
        assert_eq!(cell(&serde_json::json!(null)), "-");
        assert_eq!(cell(&serde_json::json!(3)), "3");
    }
}
