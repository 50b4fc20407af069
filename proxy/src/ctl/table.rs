//! Plain-text tables the way istioctl prints them: a header of upper-case column names, columns
//! padded to their widest cell and separated by one space, no trailing blanks.

/// A table being filled row by row.
#[derive(Debug)]
pub struct Table {
    headers: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &'static [&'static str]) -> Self {
        Self { headers, rows: Vec::new() }
    }

    /// Adds a row; missing cells are blank, extra ones are dropped.
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push(' ');
                }
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - width(cell)));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_to_the_widest_cell() {
        let mut table = Table::new(&["NAMESPACE", "POD NAME", "ADDRESS"]);
        table.row(vec!["shop".into(), "reviews-v1-5b5d6494f4-qwjv4".into(), "10.1.0.11".into()]);
        table.row(vec!["istio-system".into(), "é".into()]);
        assert_eq!(
            table.render(),
            "NAMESPACE    POD NAME                    ADDRESS\n\
             shop         reviews-v1-5b5d6494f4-qwjv4 10.1.0.11\n\
             istio-system é\n"
        );
    }
}
