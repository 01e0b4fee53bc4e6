//! Plain-text tables as istioctl prints them (Go's tabwriter layout), for the CLI's views.

/// Lays out rows like Go's tabwriter (padding 1, spaces): each column as wide as its widest
/// cell plus one space, the last column unpadded.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$} ", width = widths[c]));
            }
        }
        out.push('\n');
    }
    out
}
