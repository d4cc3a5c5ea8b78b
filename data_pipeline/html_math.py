"""HTML → plain text that keeps the math.

A pre-pass on the DOM turns rendered or embedded math back into LaTeX text nodes *before* the boilerplate
extractor runs (extractors drop ``<script>`` and flatten MathML into symbol soup):

* ``<script type="math/tex">`` (MathJax 2 source) → ``$…$``; ``; mode=display`` → ``$$…$$``;
  the rendered MathJax siblings (``.MathJax``, ``.MathJax_Preview``, ``.MathJax_Display``, …) are removed;
* KaTeX (``.katex`` / ``.katex-display``) → the TeX in its ``annotation[encoding=application/x-tex]``;
* MathML ``<math>`` (also MathJax 3 ``mjx-container``) → its TeX annotation, else a LaTeX rendering of the
  presentation MathML (``mfrac``, ``msup``, ``msub``, ``msqrt``, rows, tokens);
* ``<img class="latex" alt="…">`` (WordPress) → ``$alt$``.

Then Resiliparse ``extract_plain_text(main_content=True)`` removes navigation and boilerplate.
Guaranteed: math found by those rules survives as LaTeX between ``$`` delimiters. Not guaranteed: math drawn
as images without alt text, or math inside a region the extractor judges to be boilerplate.
"""

from __future__ import annotations

_MATHJAX_RENDERED = (
    ".MathJax_Preview, .MathJax, .MathJax_Display, .MathJax_SVG, .MathJax_SVG_Display, .MathJax_CHTML, "
    ".MJX_Assistive_MathML, .mjx-chtml"
)
_TEX_ENCODINGS = ("application/x-tex", "tex", "latex", "application/x-latex")
_MO_TEX = {"∑": r"\sum", "∏": r"\prod", "∫": r"\int", "∞": r"\infty", "≤": r"\le", "≥": r"\ge", "≠": r"\ne",
           "→": r"\to", "±": r"\pm", "×": r"\times", "·": r"\cdot", "−": "-", "∈": r"\in", "⋅": r"\cdot",
           "α": r"\alpha", "β": r"\beta", "γ": r"\gamma", "π": r"\pi", "θ": r"\theta", "λ": r"\lambda",
           "σ": r"\sigma", "μ": r"\mu", "ε": r"\epsilon", "δ": r"\delta", "Δ": r"\Delta", "∂": r"\partial",
           "√": r"\sqrt", "⁡": "", "⁢": ""}


def _tex_annotation(node) -> str | None:
    for ann in node.query_selector_all("annotation"):
        if (ann.getattr("encoding") or "").lower() in _TEX_ENCODINGS:
            return ann.text.strip()
    return None


def mathml_to_latex(node) -> str:
    """A small presentation-MathML → LaTeX converter (enough for fractions, scripts, roots, rows)."""
    tag = (node.tag or "").lower()
    kids = [c for c in node.child_nodes if c.type == 1]  # element nodes
    if tag in ("mi", "mn", "mtext", "ms"):
        t = node.text.strip()
        return "".join(_MO_TEX.get(ch, ch) for ch in t) if len(t) == 1 else (t if tag != "mtext" else rf"\text{{{t}}}")
    if tag == "mo":
        t = node.text.strip()
        return _MO_TEX.get(t, t)
    if tag in ("annotation", "annotation-xml"):
        return ""
    parts = [mathml_to_latex(k) for k in kids]
    if tag == "mfrac" and len(parts) == 2:
        return rf"\frac{{{parts[0]}}}{{{parts[1]}}}"
    if tag == "msup" and len(parts) == 2:
        return f"{{{parts[0]}}}^{{{parts[1]}}}"
    if tag == "msub" and len(parts) == 2:
        return f"{{{parts[0]}}}_{{{parts[1]}}}"
    if tag == "msubsup" and len(parts) == 3:
        return f"{{{parts[0]}}}_{{{parts[1]}}}^{{{parts[2]}}}"
    if tag == "msqrt":
        return rf"\sqrt{{{' '.join(parts)}}}"
    if tag == "mroot" and len(parts) == 2:
        return rf"\sqrt[{parts[1]}]{{{parts[0]}}}"
    if tag == "semantics":
        return parts[0] if parts else ""
    return " ".join(p for p in parts if p)


def _replace(tree, node, text: str) -> None:
    parent = node.parent
    if parent is not None:
        parent.replace_child(tree.create_text_node(text), node)


def _math_to_tex(node) -> str:
    tex = _tex_annotation(node)
    if tex is None:
        tex = mathml_to_latex(node)
    return tex


def latexify_dom(tree, html_lower: str | None = None) -> int:
    """Rewrite math in a Resiliparse ``HTMLTree`` into ``$…$`` text nodes in place; returns how many.

    ``html_lower`` (the lower-cased source) lets each DOM pass be skipped when its marker is absent: a DOM
    scan costs ~10x a substring search, and most web pages hold no math at all."""
    doc, n = tree.document, 0
    has = (lambda marker: marker in html_lower) if html_lower is not None else (lambda marker: True)
    if not (has("math") or has("katex") or has("mjx") or has("latex")):
        return 0
    # MathJax 3 containers first: they carry class "MathJax" too, and hold the only copy of the math (MathML).
    for node in doc.query_selector_all("mjx-container") if has("mjx-container") else ():
        inner = node.query_selector("math")
        if node.parent is None or inner is None:
            continue
        display = (node.getattr("display") or inner.getattr("display") or "").lower() in ("block", "true")
        delim = "$$" if display else "$"
        _replace(tree, node, f" {delim}{_math_to_tex(inner)}{delim} ")
        n += 1
    for node in doc.query_selector_all(_MATHJAX_RENDERED) if has("mathjax") or has("mjx") else ():
        if node.parent is not None:
            node.parent.remove_child(node)
    for node in doc.query_selector_all("script") if has("math/tex") else ():
        kind = (node.getattr("type") or "").lower()
        if kind.startswith("math/tex"):
            delim = "$$" if "mode=display" in kind else "$"
            _replace(tree, node, f" {delim}{node.text.strip()}{delim} ")
            n += 1
    for node in doc.query_selector_all(".katex-display, .katex") if has("katex") else ():
        if node.parent is None or not node.parent.tag:
            continue
        tex = _tex_annotation(node)
        if tex is None:
            continue
        delim = "$$" if "katex-display" in (node.getattr("class") or "") else "$"
        _replace(tree, node, f" {delim}{tex}{delim} ")
        n += 1
    for node in doc.query_selector_all("math") if has("<math") else ():
        if node.parent is None:
            continue
        inner = node
        display = (inner.getattr("display") or "").lower() in ("block", "true")
        delim = "$$" if display else "$"
        _replace(tree, node, f" {delim}{_math_to_tex(inner)}{delim} ")
        n += 1
    for node in doc.query_selector_all("img.latex, img.tex, img[class*=math]") if has("<img") else ():
        alt = (node.getattr("alt") or "").strip()
        if alt:
            _replace(tree, node, f" ${alt}$ ")
            n += 1
    return n


def html_to_text(html: str, *, main_content: bool = True) -> str:
    """Extract main-content text with math kept as LaTeX (see the module docstring for the rules)."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    if tree.document is None:
        return ""
    latexify_dom(tree, html.lower())
    return extract_plain_text(tree, main_content=main_content, alt_texts=False, preserve_formatting=True).strip()
