"""Domain discovery and URL-path annotation (DeepSeekMath §2.1, steps 3–4). Pure Python.

* :func:`domain_of` – host, or registered domain using a small offline public-suffix list (multi-part
  suffixes such as ``co.uk``; everything else is treated as a one-label suffix).
* :func:`discover` – per domain: pages, pages kept, kept fraction, and per URL-path prefix the same plus the
  score distribution; domains with more than ``min_kept_fraction`` of their pages kept are flagged.
* :func:`auto_annotate` – path rules plus score statistics decide math / not math for each flagged prefix,
  so the loop runs unattended. :func:`merge_annotations` lets a person's YAML override it pattern by pattern.
* Annotation YAML: ``{math: [host/path-glob, ...], not_math: [...]}``; globs use ``fnmatch`` on
  ``host/path`` (no scheme, no ``www.``), e.g. ``mathoverflow.net/questions*``.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import yaml

from dsmath.errors import UserError

# Offline: the multi-part public suffixes that matter in practice; a full list can be passed in.
MULTI_PART_SUFFIXES = frozenset(
    "co.uk org.uk ac.uk gov.uk me.uk ltd.uk plc.uk net.uk sch.uk co.jp ac.jp ne.jp or.jp go.jp com.au net.au "
    "org.au edu.au gov.au com.cn net.cn org.cn edu.cn gov.cn ac.cn com.br org.br gov.br edu.br co.in ac.in "
    "org.in gov.in net.in co.kr ac.kr or.kr go.kr co.nz ac.nz org.nz govt.nz co.za ac.za org.za gov.za com.tw "
    "edu.tw org.tw gov.tw com.hk edu.hk org.hk gov.hk com.sg edu.sg gov.sg com.mx edu.mx gob.mx com.ar edu.ar "
    "gob.ar com.tr edu.tr gov.tr ac.il co.il org.il ac.ir ac.th co.th ac.at co.at com.ru edu.ru com.ua edu.pl "
    "com.pl github.io gitlab.io blogspot.com wordpress.com appspot.com herokuapp.com".split()
)

# URL-path words that say "this section is content about math" / "this is navigation, never content".
MATH_PATH_WORDS = re.compile(r"math|theorem|proof|lemma|algebra|calculus|geometry|wiki|problem|lecture|"
                             r"course|notes|arxiv|abs", re.I)
NOT_CONTENT_PATH_WORDS = re.compile(r"^/?(login|signup|users?|tags?|search|cart|account|privacy|terms|about|"
                                    r"contact|jobs|careers|ads?)(/|$)", re.I)


def host_of(url: str) -> str:
    host = (urlsplit(url if "://" in url else f"http://{url}").hostname or "").lower()
    return host.removeprefix("www.")


def domain_of(url: str, granularity: str = "host", suffixes: frozenset[str] = MULTI_PART_SUFFIXES) -> str:
    host = host_of(url)
    if granularity == "host" or re.fullmatch(r"[\d.]+", host):
        return host
    labels = host.split(".")
    if len(labels) >= 3 and ".".join(labels[-2:]) in suffixes:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def path_prefix(url: str, depth: int = 1) -> str:
    path = urlsplit(url if "://" in url else f"http://{url}").path or "/"
    parts = [p for p in path.split("/") if p][:depth]
    return "/" + "/".join(parts)


def url_key(url: str) -> str:
    """``host/path`` as annotation globs see it."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return host_of(url) + (parts.path or "/")


def discover(rows: list[dict], kept_ids: set[str], *, granularity: str = "host", min_kept_fraction: float = 0.10,
             min_pages: int = 5, path_depth: int = 1) -> list[dict]:
    """One entry per domain (sorted by pages kept): counts, kept fraction, ``flagged``, and path prefixes."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_domain[domain_of(r["url"], granularity)].append(r)
    out = []
    for dom, rs in by_domain.items():
        kept = sum(r["id"] in kept_ids for r in rs)
        frac = kept / len(rs)
        paths: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            paths[host_of(r["url"]) + path_prefix(r["url"], path_depth)].append(r)
        path_stats = []
        for prefix, prs in sorted(paths.items()):
            scores = np.array([r.get("score", 0.0) for r in prs])
            path_stats.append({
                "prefix": prefix, "pages": len(prs), "kept": sum(r["id"] in kept_ids for r in prs),
                "kept_fraction": sum(r["id"] in kept_ids for r in prs) / len(prs),
                "score_mean": float(scores.mean()), "score_p10": float(np.percentile(scores, 10)),
                "score_p50": float(np.median(scores)), "score_p90": float(np.percentile(scores, 90)),
            })
        out.append({"domain": dom, "pages": len(rs), "kept": kept, "kept_fraction": frac,
                    "flagged": frac > min_kept_fraction and len(rs) >= min_pages, "paths": path_stats})
    out.sort(key=lambda d: (-d["kept"], d["domain"]))
    return out


def path_glob(prefix: str) -> str:
    """``host/questions`` → ``host/questions*``; the bare root ``host/`` matches the home page only, never the
    whole site."""
    return prefix if prefix.endswith("/") else prefix + "*"


def auto_annotate(domains: list[dict], *, min_mean_score: float = 0.5, min_kept_fraction: float = 0.5,
                  min_pages: int = 3) -> dict:
    """Decide every path prefix of every flagged domain: math if the path is content (not navigation), holds
    at least ``min_pages`` pages (one lucky page is no evidence), its mean score ≥ ``min_mean_score`` and
    ≥ ``min_kept_fraction`` of its pages were kept; or if a math word is in the path and the median score
    clears the bar. Everything else in a flagged domain is not math."""
    ann: dict[str, list[str]] = {"math": [], "not_math": []}
    for d in domains:
        if not d["flagged"]:
            continue
        for p in d["paths"]:
            path = p["prefix"][len(p["prefix"].split("/")[0]):]
            is_nav = bool(NOT_CONTENT_PATH_WORDS.search(path))
            strong = p["score_mean"] >= min_mean_score and p["kept_fraction"] >= min_kept_fraction
            worded = bool(MATH_PATH_WORDS.search(path)) and p["score_p50"] >= min_mean_score
            is_math = (strong or worded) and not is_nav and p["pages"] >= min_pages
            ann["math" if is_math else "not_math"].append(path_glob(p["prefix"]))
    return ann


def load_annotations(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: annotation file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) - {"math", "not_math"}:
        raise UserError(f"{p}: expected a mapping with keys 'math' and/or 'not_math' (lists of host/path globs)")
    out = {}
    for key in ("math", "not_math"):
        vals = data.get(key) or []
        if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
            raise UserError(f"{p}: '{key}' must be a list of host/path glob strings")
        out[key] = list(vals)
    return out


def merge_annotations(auto: dict, person: dict | None) -> dict:
    """The person's patterns first: :func:`classify_url` takes the first matching pattern, so they win."""
    if not person:
        return {"rules": _auto_rules(auto)}
    rules = [(g, "math") for g in person.get("math", [])] + [(g, "not_math") for g in person.get("not_math", [])]
    rules += _auto_rules(auto)
    return {"rules": rules}


def _auto_rules(auto: dict) -> list[tuple[str, str]]:
    """Automatic rules, most specific (longest) pattern first, so a sub-path verdict beats its parent's."""
    rules = [(g, "math") for g in auto["math"]] + [(g, "not_math") for g in auto["not_math"]]
    return sorted(rules, key=lambda r: -len(r[0]))


def classify_url(url: str, rules: list[tuple[str, str]]) -> str | None:
    """'math', 'not_math', or None when no pattern matches; the first matching rule decides."""
    key = url_key(url)
    for glob, verdict in rules:
        if fnmatch.fnmatchcase(key, glob):
            return verdict
    return None
