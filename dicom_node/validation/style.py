"""The validation report's styles: inline in report.html, and served by the admin page
(whose Content-Security-Policy refuses inline styles) from ``/admin/validation/report.css``."""

# Every rule is scoped under .vr-report so the fragment cannot restyle the admin page.
REPORT_CSS = """
.vr-report { font-family: system-ui, -apple-system, "Segoe UI", Arial, sans-serif;
  color: #1b1f24; line-height: 1.4; }
.vr-report h1 { font-size: 1.5em; margin: 0 0 .3em 0; }
.vr-report h2 { font-size: 1.2em; margin: 1.2em 0 .4em 0; }
.vr-report h3 { font-size: 1.05em; margin: 1em 0 .3em 0; }
.vr-report .vr-badge { display: inline-block; background: #b3261e; color: #fff;
  font-weight: 700; letter-spacing: .08em; padding: .15em .6em; border-radius: .3em;
  vertical-align: middle; font-size: .8em; }
.vr-report .vr-warn { border: 2px solid #b3261e; background: #fdecea; padding: .5em .8em;
  margin: .5em 0; font-weight: 600; }
.vr-report .vr-disclaimer { font-style: italic; margin: .4em 0; }
.vr-report .vr-meta { border-collapse: collapse; margin: .4em 0; }
.vr-report .vr-meta th { text-align: left; padding: .1em 1em .1em 0; font-weight: 600; }
.vr-report .vr-meta td { padding: .1em 0; }
.vr-report .vr-scroll { overflow-x: auto; }
.vr-report .vr-summary { border-collapse: collapse; font-size: .85em; }
.vr-report .vr-summary th, .vr-report .vr-summary td { border: 1px solid #c9ced6;
  padding: .25em .45em; vertical-align: top; }
.vr-report .vr-summary th { background: #eef1f5; text-align: left; }
.vr-report .vr-summary td.vr-num { text-align: right; white-space: nowrap; }
.vr-report .vr-ci { color: #57606a; font-size: .9em; white-space: nowrap; }
.vr-report .vr-status { font-style: italic; color: #57606a; }
.vr-report .vr-plots { display: flex; flex-wrap: wrap; gap: 1em; }
.vr-report figure { margin: 0; }
.vr-report figcaption { font-size: .8em; color: #57606a; max-width: 320px; }
"""

PAGE_CSS = "body { margin: 1.5em; background: #fff; }"
