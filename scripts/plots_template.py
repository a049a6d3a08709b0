"""Write the HTML page template that makes `dvc plots show` work offline.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so without network access the
charts stay blank. This page inlines them instead, from vl-convert-python's JavaScript bundle (an
installed PyPI package, so no JavaScript is kept in git). `.dvc/config` points `plots.html_template`
at the output; scripts/setup regenerates it after installing the packages.

    python scripts/plots_template.py [OUTPUT]     (default: .dvc/offline_plots.html)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / ".dvc" / "offline_plots.html"

# DVC's built-in templates are Vega-Lite 5 specs (its CDN page loads 5.2), so bundle the newest 5.x
# rather than vl-convert's default 6.x.
VEGA_LITE_MAJOR = 5

# Placeholders that dvc_render replaces everywhere in the page. `{scripts}` is left out on purpose:
# it is where DVC puts its CDN <script> tags.
DVC_PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {vega_embed}: bundled by vl-convert-python {vl_convert} -->
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def newest_vega_lite(major: int) -> str:
    """The newest Vega-Lite of that major version that vl-convert can bundle, e.g. '5.21'."""
    import vl_convert

    versions = [v for v in vl_convert.get_vegalite_versions() if int(v.split(".")[0]) == major]
    if not versions:
        raise RuntimeError(f"vl-convert-python {vl_convert.__version__} bundles no Vega-Lite {major}.x")
    return max(versions, key=lambda v: tuple(int(part) for part in v.split(".")))


def offline_page() -> str:
    """The page: DVC's default layout with the libraries inline and `{plot_divs}` where the charts go.

    The bundle sets `window.vegaEmbed`, which DVC's plot divs call.
    """
    import vl_convert

    vega_lite = newest_vega_lite(VEGA_LITE_MAJOR)
    # "</script" would end the inline script early; "<\/script" means the same inside JS strings and regexes.
    bundle = vl_convert.javascript_bundle(vl_version=f"v{vega_lite}").replace("</script", "<\\/script")
    clashes = [p for p in DVC_PLACEHOLDERS if p in bundle]
    if clashes:
        raise RuntimeError(f"the JavaScript bundle contains {clashes}, which DVC would replace")
    versions = {"{vega}": vl_convert.get_vega_version(), "{vega_lite}": vega_lite,
                "{vega_embed}": vl_convert.get_vega_embed_version(), "{vl_convert}": vl_convert.__version__}
    page = PAGE
    for placeholder, value in versions.items():
        page = page.replace(placeholder, value)
    return page.replace("{bundle}", bundle)  # last, so nothing inside the bundle is replaced


def write_atomically(path: Path, text: str) -> None:
    """Write beside the target, then rename: `dvc plots show` never reads a half-written page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the offline page template for `dvc plots show`.")
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where to write it (default: {DEFAULT_OUTPUT})")
    output = parser.parse_args(argv).output
    write_atomically(output, offline_page())
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
