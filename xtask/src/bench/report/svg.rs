//! BENCHMARKS.svg: two panels against log10(rules), drawn by hand (no
//! plotting crate for one chart): rulebpf's connects/s, with dashed lines
//! for no hook and nft SNAT, and compile + attach seconds.

use std::fmt::Write as _;

use serde_json::Value;

/// Two panels against log10(rules): connects/s (with the no-hook and nft
/// lines) and compile+attach seconds.
pub fn render(j: &Value) -> String {
    let results = j["results"].as_array().unwrap();
    let rate_of = |name: &str| {
        results
            .iter()
            .find(|r| r["config"] == name)
            .and_then(|r| r["connects_per_sec"].as_f64())
            .unwrap_or(0.0)
    };
    let points: Vec<(f64, f64)> = results
        .iter()
        .filter_map(|r| Some((r["rules"].as_f64()?, r["connects_per_sec"].as_f64()?)))
        .collect();
    let attach: Vec<(f64, f64)> = j["attach"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| Some((a["rules"].as_f64()?, a["attach_seconds"].as_f64()?)))
        .collect();
    let (w, h, pad) = (420.0, 260.0, 50.0);
    let panel = |x0: f64, title: &str, series: &[(f64, f64)], refs: &[(&str, f64, &str)]| {
        let ymax = series
            .iter()
            .map(|p| p.1)
            .chain(refs.iter().map(|r| r.1))
            .fold(0.0f64, f64::max)
            * 1.15;
        let x = |rules: f64| x0 + pad + (rules.log10() / 5.0) * (w - 2.0 * pad);
        let y = |v: f64| h - pad + 10.0 - v / ymax * (h - 2.0 * pad);
        let mut s = format!(
            "<text x='{}' y='20' font-size='14' text-anchor='middle'>{title}</text>\n\
             <line x1='{}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n\
             <line x1='{}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n",
            x0 + w / 2.0,
            x0 + pad,
            y(0.0),
            x0 + w - pad,
            y(0.0),
            x0 + pad,
            y(0.0),
            x0 + pad,
            y(ymax)
        );
        for e in 0..=5 {
            let rules = 10f64.powi(e);
            let _ = writeln!(
                s,
                "<text x='{}' y='{}' font-size='10' text-anchor='middle'>{}</text>",
                x(rules),
                y(0.0) + 14.0,
                rules as u64
            );
        }
        let _ = writeln!(
            s,
            "<text x='{}' y='{}' font-size='10' text-anchor='end'>{}</text>",
            x0 + pad - 4.0,
            y(ymax) + 4.0,
            if ymax < 10.0 {
                format!("{ymax:.2}")
            } else {
                format!("{ymax:.0}")
            }
        );
        let _ = writeln!(
            s,
            "<text x='{}' y='{}' font-size='11' text-anchor='middle'>rules</text>",
            x0 + w / 2.0,
            h - 5.0
        );
        for (label, v, color) in refs {
            let (x1, x2, yv) = (x0 + pad, x0 + w - pad, y(*v));
            let _ = writeln!(
                s,
                "<line x1='{x1}' y1='{yv}' x2='{x2}' y2='{yv}' stroke='{color}' stroke-dasharray='4'/>\
                 <text x='{x2}' y='{}' font-size='10' fill='{color}' text-anchor='end'>{label}</text>",
                yv - 3.0
            );
        }
        let path: Vec<String> = series
            .iter()
            .map(|&(r, v)| format!("{:.1},{:.1}", x(r), y(v)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{}'/>",
            path.join(" ")
        );
        for &(r, v) in series {
            let _ = writeln!(
                s,
                "<circle cx='{:.1}' cy='{:.1}' r='3' fill='#1f77b4'/>",
                x(r),
                y(v)
            );
        }
        s
    };
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{h}' font-family='sans-serif'>\n<rect width='100%' height='100%' fill='white'/>\n",
        2.0 * w
    );
    svg += &panel(
        0.0,
        "rulebpf connects/s",
        &points,
        &[
            ("no hook", rate_of("no hook"), "green"),
            ("nft SNAT", rate_of("nft SNAT"), "red"),
        ],
    );
    svg += &panel(w, "compile + attach seconds", &attach, &[]);
    svg += "</svg>\n";
    svg
}
