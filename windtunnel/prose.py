"""`prose`: English text from Debian's documentation and dictionary packages (docs/data.md).

`corpus_text("prose")` downloads the packages below with `apt-get download` (Debian's package
client, the one registry of text this project can reach besides PyPI), reads each .deb itself
(ar + tar, no dpkg needed), keeps the files its rule names, turns each into plain paragraphs and
keeps those that read as prose (`prose_paragraphs`). The text is written once to the cache with a
manifest of every package's version and SHA-256: the same packages give the same bytes.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import io
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from windtunnel.errors import ConfigError
from windtunnel.files import write_atomically, write_json

# Bump when the extraction changes: cached text of another version is rebuilt, not reused.
EXTRACTOR = 1

_EN_HTML = r"(?!.*_sources/).*\.html?$"
# (package, files to keep (regex on the path inside the .deb), how to read them). Sources over
# rendered HTML where a package ships both; English only where it ships translations.
PROSE_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("linux-doc-6.1", r"/Documentation/.*\.rst(\.gz)?$", "text"),
    ("python3.11-doc", r"/_sources/.*\.rst\.txt$", "text"),
    ("dict-gcide", r"gcide\.dict\.dz$", "dict"),
    ("wordnet-base", r"/wordnet/data\.(noun|verb|adj|adv)$", "wordnet"),
    ("perl-doc", r"\.pod(\.gz)?$", "text"),
    ("postgresql-doc-15", r"/html/" + _EN_HTML, "html"),
    ("git-doc", r"/git-doc/.*\.txt(\.gz)?$", "text"),
    ("debian-reference-en", r"\.en\.txt(\.gz)?$", "text"),
    ("debian-handbook", r"/html/en-US/" + _EN_HTML, "html"),
    ("jargon-text", r"jargon\.txt(\.gz)?$", "text"),
    ("dict-foldoc", r"foldoc\.dict\.dz$", "dict"),
    ("python-django-doc", r"/html/" + _EN_HTML, "html"),
    ("python-sqlalchemy-doc", r"/rst/.*\.rst(\.gz)?$", "text"),
    ("sphinx-doc", r"/_sources/.*\.(rst\.)?txt$", "text"),
    ("python-sklearn-doc", r"/_sources/.*\.(rst\.)?txt$", "text"),
    ("python-pandas-doc", r"/_sources/.*\.(rst\.)?txt$", "text"),
    ("python-scipy-doc", r"/html/" + _EN_HTML, "html"),
    ("nodejs-doc", r"/api/.*\.md(\.gz)?$", "text"),
    ("apache2-doc", r"/manual/en/.*\.html$", "html"),
    ("gimp-help-en", r"/help/en/" + _EN_HTML, "html"),
    ("kicad-doc-en", r"/help/en/" + _EN_HTML, "html"),
    ("lilypond-doc-html", r"/Documentation/[^.]*\.html$", "html"),
    ("cppreference-doc-en-html", r"/html/en/" + _EN_HTML, "html"),
    ("erlang-doc", r"/doc/html/" + _EN_HTML, "html"),
    ("racket-doc", r"/racket/" + _EN_HTML, "html"),
    ("rust-doc", r"/html/(book|reference|rust-by-example|nomicon|cargo|rustc|edition-guide|embedded-book|"
                 r"unstable-book|rustdoc|std)/" + _EN_HTML, "html"),
    ("openjdk-17-doc", r"/api/(?!.*/class-use/)" + _EN_HTML, "html"),
    ("ghc-doc", r"/html/(users_guide|libraries/base-[^/]*)/(?!src/)" + _EN_HTML, "html"),
    ("python-statsmodels-doc", r"/html/" + _EN_HTML, "html"),
    ("python-astropy-doc", r"/html/" + _EN_HTML, "html"),
    ("python-sympy-doc", r"/html/" + _EN_HTML, "html"),
    ("python-skimage-doc", r"/html/" + _EN_HTML, "html"),
    ("python-dask-doc", r"/html/" + _EN_HTML, "html"),
    ("qtbase5-doc-html", r"/qt5/doc/.*\.html$", "html"),
    ("libboost1.81-doc", r"/libboost1\.81-doc/(?!examples/).*\.html?$", "html"),
    ("installation-guide-amd64", r"/installation-guide-amd64/en/.*\.html$", "html"),
    ("libreoffice-help-en-us", r"/help/en-US/.*\.html$", "html"),
    ("wireshark-doc", r"_html_chunked/.*\.html$", "html"),
    ("octave-doc", r"/octave\.html/.*\.html$", "html"),
    ("maxima-doc", r"/maxima-doc/html/.*\.html$", "html"),
    ("vim-runtime", r"/vim90/doc/.*\.txt$", "text"),
    ("zsh-doc", r"/zsh-common/html/.*\.html$", "html"),
    ("gnuplot-doc", r"/htmldocs/.*\.html$", "html"),
    ("libvirt-doc", r"/libvirt-doc/html/.*\.html$", "html"),
    ("ffmpeg-doc", r"/ffmpeg/manual/.*\.html$", "html"),
    # TeX Live's package manuals, as PDF: read with pdftotext (poppler-utils)
    ("texlive-latex-base-doc", r"\.pdf$", "pdf"),
    ("texlive-latex-recommended-doc", r"\.pdf$", "pdf"),
    ("texlive-latex-extra-doc", r"\.pdf$", "pdf"),
    ("texlive-science-doc", r"\.pdf$", "pdf"),
    ("texlive-humanities-doc", r"\.pdf$", "pdf"),
    ("texlive-publishers-doc", r"\.pdf$", "pdf"),
    ("texlive-pictures-doc", r"\.pdf$", "pdf"),
    # not pst-moire's manual (6.7 MB of moire drawings): pdftotext took minutes on it and, on a loaded
    # machine, past PDF_SECONDS, so the committed corpus (text 55a69a74...) was built without it
    ("texlive-pstricks-doc", r"(?<!/pst-moire-doc)\.pdf$", "pdf"),
    ("texlive-metapost-doc", r"\.pdf$", "pdf"),
    ("texlive-fonts-extra-doc", r"\.pdf$", "pdf"),
    # added to reach 100M tokens (docs/data.md): more manuals, the Bible in two English translations
    # and two commentaries (SWORD modules), TeX Live's collections that carry their manuals inside
    ("sagemath-doc", r"/sagemath/html/en/" + _EN_HTML, "html"),
    ("scala-doc", r"/scala-2\.11/api/library/.*\.html$", "html"),
    ("fp-docs-3.2.2", r"/fp-docs/3\.2\.2/.*\.html$", "html"),
    ("petsc3.18-doc", r"/docs/_sources/.*\.txt$", "text"),
    ("llvm-15-doc", r"/html/_sources/.*\.txt$", "text"),
    ("sqlite3-doc", r"/doc/sqlite3/.*\.html$", "html"),
    ("swi-prolog-doc", r"/swi-prolog/doc/(Manual|packages)/.*\.html$", "html"),
    ("ada-reference-manual-2020", r"/aarm2020\.txt/.*\.TXT$", "text"),
    ("opencv-doc", r"/opencv4/html/.*\.html$", "html"),
    ("wx3.2-doc", r"/wx3\.2-doc/html/.*\.html$", "html"),
    ("cmake-doc", r"/cmake-data/html/.*\.html$", "html"),
    ("grass-doc", r"/grass-doc/html/.*\.html$", "html"),
    ("imagemagick-6-doc", r"/html/www/.*\.html$", "html"),
    ("db5.3-doc", r"/db5\.3-doc/(programmer_reference|api_reference/C|installation|gsg[^/]*)/.*\.html$", "html"),
    ("twisted-doc", r"/html/_sources/.*\.txt$", "text"),
    ("abs-guide", r"\.html$", "html"),
    ("bash-doc", r"\.html$", "html"),
    ("gettext-doc", r"\.html$", "html"),
    ("guile-3.0-doc", r"\.info(-\d+)?(\.gz)?$", "text"),
    ("libcommons-math3-java-doc", r"^(?!.*/class-use/).*\.html$", "html"),
    ("libapache-poi-java-doc", r"^(?!.*/class-use/).*\.html$", "html"),
    ("crawl-common", r"/crawl/dat/descript/.*\.txt$", "text"),
    ("python-biopython-doc", r"/Doc/.*\.html$", "html"),
    ("ghostscript-doc", r"\.html?$", "html"),
    ("macaulay2-common", r"/doc/Macaulay2/.*/html/.*\.html$", "html"),
    ("emacs-common", r"/emacs/28\.2/etc/(NEWS(\.\d+)?|TUTORIAL|DEBUG|PROBLEMS|ETAGS\.README|CENSORSHIP|HISTORY|JOKES|"
                     r"MACHINES|THE-GNU-PROJECT|LINUX-GNU|MOTIVATION|WHY-FREE|gnu\.txt)(\.gz)?$", "text"),
    ("singular-doc", r"/info/singular\.info(\.gz)?$", "text"),
    ("gcl-doc", r"\.info(-\d+)?(\.gz)?$", "text"),
    *((p, r"\.html$", "html") for p in (
        "exim4-doc-html", "bind9-doc", "postfix-doc", "mit-scheme-doc", "clisp-doc", "sbcl-doc", "debian-policy",
        "developers-reference", "debmake-doc", "harden-doc", "debian-history", "libgtk-3-doc", "libgtk-4-doc",
        "libglib2.0-doc")),
    ("libstdc++-12-doc", r"/libstdc\+\+/(?!user/|api/).*\.html$", "html"),
    ("dict-devil", r"\.dict\.dz$", "dict"),
    *((p, r"^(?!.*/class-use/).*\.html$", "html") for p in (
        "derby-doc", "libbiojava-java-doc", "libxerces2-java-doc", "libcommons-lang3-java-doc", "libjfreechart-java-doc",
        "libcommons-collections4-java-doc")),
    *((f"{q}-doc-html", r"/qt5/doc/.*\.html$", "html") for q in (
        "qt3d5", "qtcharts5", "qtconnectivity5", "qtdatavisualization5", "qtdeclarative5", "qtlocation5",
        "qtmultimedia5", "qtquickcontrols2-5", "qtscript5", "qtsensors5", "qtserialbus5", "qtsvg5", "qttools5",
        "qtwayland5", "qtwebengine5", "qtwebsockets5", "qtxmlpatterns5")),
    *((p, r"/modules/.*\.[bc]z[sz]$", "sword") for p in (
        "sword-text-web", "sword-text-kjv", "sword-comm-mhcc", "sword-comm-tdavid")),
    ("r-doc-pdf", r"/manual/(?!fullrefman).*\.pdf$", "pdf"),
    ("pari-doc", r"\.pdf$", "pdf"),
    *((p, r"\.pdf$", "pdf") for p in (
        "texlive-lang-english", "context", "texlive-bibtex-extra", "texlive-extra-utils", "texlive-music",
        "texlive-games", "texlive-plain-generic", "texlive-luatex", "texlive-lang-other", "texlive-lang-european",
        "texlive-xetex", "texlive-formats-extra", "texlive-base")),
)

_TAG = re.compile(r"<[^>]*>")
_DROP = re.compile(r"<(script|style|pre|code|nav|head)\b.*?</\1\s*>", re.S | re.I)
_BLOCK = re.compile(r"</?(p|div|li|h[1-6]|dd|dt|tr|td|th|br|section|blockquote|table|ul|ol|dl)\b[^>]*>", re.I)


def html_text(page: str) -> str:
    """Visible text of an HTML page, one block per paragraph; code, scripts and menus dropped."""
    page = _DROP.sub(" ", page)
    page = _BLOCK.sub("\n\n", page)
    return html.unescape(_TAG.sub("", page))


# English's commonest words: a tenth of any English paragraph's words, a few hundredths of code's
# or another language's.
_ENGLISH = frozenset("the of and to a in is that for it as with be on are this by or an can not "
                     "from at which if you when has have its will was".split())


def prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of `text` (blocks between blank lines, re-flowed onto one line) that read as
    English prose: at least 8 words, mostly letters, words of natural length, a sentence's
    punctuation, English's commonest words. Code, tables, lists of names, markup-only lines and
    other languages fail one of these."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        words = block.split()
        if len(words) < 8:
            continue
        para = " ".join(words)
        letters = sum(c.isalpha() or c == " " for c in para)
        mean_word = sum(map(len, words)) / len(words)
        common = sum(w.lower().strip(".,;:()\"'") in _ENGLISH for w in words)
        if (letters >= 0.85 * len(para) and 3 <= mean_word <= 9 and common >= 0.1 * len(words)
                and re.search(r"[a-z][.?!:;,]", para)):
            out.append(para)
    return out


# A PDF heavier than this per page is pictures or font samples, not a manual: little text, and
# pdftotext can spend many minutes on one such page (a 3-page, 1.9 MB one took over 10 on this machine).
PDF_BYTES_PER_PAGE = 300_000
PDF_SECONDS = 600


def pdf_text(data: bytes, name: str = "") -> str:
    """A PDF's text by pdftotext (poppler-utils), words hyphenated at line ends joined again; ""
    for a PDF of more than PDF_BYTES_PER_PAGE per page."""
    with tempfile.NamedTemporaryFile(suffix=".pdf") as f:
        f.write(data)
        f.flush()
        info = subprocess.run(["pdfinfo", f.name], capture_output=True, text=True, errors="replace").stdout
        pages = re.search(r"^Pages:\s+(\d+)", info, re.M)
        if not pages or len(data) > PDF_BYTES_PER_PAGE * int(pages.group(1)):
            return ""
        try:
            r = subprocess.run(["pdftotext", "-q", "-enc", "UTF-8", f.name, "-"], capture_output=True,
                               timeout=PDF_SECONDS)
        except subprocess.TimeoutExpired:  # a last resort: this machine's output may then differ from another's
            print(f"data prepare: pdftotext ran {PDF_SECONDS} s on {name}; skipped", file=sys.stderr, flush=True)
            return ""
    return re.sub(r"(\w)-\n(\w)", r"\1\2", r.stdout.decode("utf-8", errors="replace"))


def _dict_text(raw: str) -> str:
    """A dictd database (gcide, foldoc): entries without the headword markup and source tags."""
    raw = re.sub(r"\[\d{4} Webster\]|\[PJC\]|\[WordNet 1\.5\]", "", raw)
    raw = re.sub(r"<[^>]*>|\\[^\\\n]*\\", "", raw)  # <i>...</i> markup, \Pro*nun"ci*a*tion\
    return raw.replace("{", "").replace("}", "")


def _wordnet_text(raw: str) -> str:
    """WordNet's data files: each synset's gloss (after '| '), one paragraph each."""
    return "\n\n".join(line.split(" | ", 1)[1].strip() for line in raw.splitlines() if " | " in line)


_OSIS_BREAK = re.compile(r"<(div|p|title|chapter|lb|lg|l|list|item|milestone[^>]*x-p)\b[^>]*>|</(p|title|l|item)>")


def sword_paragraphs(raw: dict[str, bytes]) -> list[tuple[str, list[str]]]:
    """Prose of a SWORD module (Bible texts and commentaries: CrossWire's format): each
    `*.?zz` file is zlib blocks that its `*.?zs` index (offset, size, size unpacked: 3 x uint32)
    finds, holding OSIS markup; notes dropped, paragraph and title tags turned into blank lines."""
    out = []
    for name in sorted(n for n in raw if n.endswith("zz") and n[:-1] + "s" in raw):
        index, data, text = raw[name[:-1] + "s"], raw[name], []
        for i in range(0, len(index) - 11, 12):
            offset, size, _ = struct.unpack("<III", index[i:i + 12])
            if size:
                text.append(zlib.decompress(data[offset:offset + size]).decode("utf-8", errors="replace"))
        osis = re.sub(r"<note\b.*?</note>", " ", " ".join(text), flags=re.S)
        out.append((name, prose_paragraphs(html.unescape(_TAG.sub("", _OSIS_BREAK.sub("\n\n", osis))))))
    return out


def file_paragraphs(name: str, data: bytes, kind: str) -> list[str]:
    """Prose paragraphs of one file of a package, read as `kind`."""
    if name.endswith((".gz", ".dz")):
        data = gzip.decompress(data)
    text = pdf_text(data, name) if kind == "pdf" else data.decode("utf-8", errors="replace")
    if kind == "html":
        text = html_text(text)
    elif kind == "dict":
        text = _dict_text(text)
    elif kind == "wordnet":
        return [" ".join(g.split()) for g in _wordnet_text(text).split("\n\n") if len(g.split()) >= 4]
    return prose_paragraphs(text)


def deb_paragraphs(deb: Path, keep: str, kind: str) -> list[tuple[str, list[str]]]:
    """(path, paragraphs) of each kept regular file of a .deb, sorted by path: an ar archive whose
    data.tar.* member holds the files (symlinks are skipped: their targets are read once)."""
    blob = deb.read_bytes()
    if blob[:8] != b"!<arch>\n":
        raise ConfigError(f"data prepare: {deb} is not a Debian package (no ar header)")
    pos, data = 8, None
    while pos + 60 <= len(blob):
        name, size = blob[pos:pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            data = blob[pos + 60:pos + 60 + size]
            break
        pos += 60 + size + (size & 1)
    if data is None:
        raise ConfigError(f"data prepare: {deb} holds no data.tar member")
    rule, files, raw = re.compile(keep), [], {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:  # a stream: one pass
            for m in tar:
                if m.isreg() and rule.search(m.name):
                    if kind == "sword":  # an index and its data: read together once both are in
                        raw[m.name] = tar.extractfile(m).read()
                    else:
                        files.append((m.name, file_paragraphs(m.name, tar.extractfile(m).read(), kind)))
    except tarfile.CompressionError as e:  # a zstd data.tar: Python reads it only from 3.14
        raise ConfigError(f"data prepare: cannot read {deb.name}'s {e}") from None
    return sorted(files + sword_paragraphs(raw))


def package_text(deb: Path, keep: str, kind: str, parts: Path) -> Path:
    """One package's prose (its files' paragraphs, each file a document ending in a blank line
    pair), extracted once into parts/: named by the .deb and its rule, so a package added to the
    list is the only one read again. Beside it, PART.json: the CPU seconds the extraction took
    (pdftotext's included), what `windtunnel.bench.prose_stats` reports."""
    rule = hashlib.sha256(f"{keep}|{kind}".encode()).hexdigest()[:12]
    out = parts / f"{deb.stem}.{rule}.txt"
    if not out.is_file():
        t0, c0 = time.monotonic(), _cpu_seconds()
        docs = [("\n\n".join(paras) + "\n\n\n").encode() for _, paras in deb_paragraphs(deb, keep, kind) if paras]
        write_json(out.with_suffix(".json"), {"cpu_seconds": round(_cpu_seconds() - c0, 1),
                                              "wall_seconds": round(time.monotonic() - t0, 1)})
        write_atomically(out, lambda tmp: tmp.write_bytes(b"".join(docs)))
    return out


def _cpu_seconds() -> float:
    """This process's CPU time and its finished children's (pdftotext)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _package_text(job: tuple) -> Path:
    return package_text(*job)


def fetch_debs(packages: list[str], deb_dir: Path) -> dict[str, Path]:
    """{package: .deb} downloaded by `apt-get download` into deb_dir (kept: a later build reuses
    them). Missing apt-get, or a package the archive does not hold, is one line naming it."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0]: p for p in deb_dir.glob("*.deb")}
    need = [p for p in packages if p not in have]
    if need:
        if shutil.which("apt-get") is None:
            raise ConfigError("data prepare prose: needs apt-get (Debian's package client) to download "
                              f"{', '.join(need)}; or carry its text (docs/data.md)")
        print(f"data prepare: downloading {len(need)} Debian packages with apt-get ({', '.join(need)})",
              file=sys.stderr, flush=True)
        r = subprocess.run(["apt-get", "download", *need], cwd=deb_dir, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"data prepare prose: apt-get download failed ({last}); run `apt-get update` first?")
        have = {p.name.split("_")[0]: p for p in deb_dir.glob("*.deb")}
    return {p: have[p] for p in packages}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def corpus_dir(cache: Path) -> Path:
    return cache / f"prose-x{EXTRACTOR}"


def rules_sha256(packages: tuple) -> str:
    return hashlib.sha256(json.dumps(packages).encode()).hexdigest()


def built(cache: Path, packages: tuple | None = None) -> bool:
    """True when cache/ holds the corpus text of this package list."""
    out = corpus_dir(cache)
    if not ((out / "corpus.json").is_file() and (out / "prose.txt").is_file()):
        return False
    held = json.loads((out / "corpus.json").read_text()).get("rules_sha256")
    return held == rules_sha256(PROSE_PACKAGES if packages is None else packages)


def corpus_text(cache: Path, packages: tuple | None = None) -> tuple[Path, dict]:
    """(text file, manifest) of the prose corpus under cache/, built once: a later call with the
    same package list reads the manifest and returns, touching neither apt nor the packages."""
    packages = PROSE_PACKAGES if packages is None else packages
    out = corpus_dir(cache)
    text, manifest = out / "prose.txt", out / "corpus.json"
    rules = rules_sha256(packages)
    if built(cache, packages):  # another list is rebuilt, from the packages' extracted parts
        return text, json.loads(manifest.read_text())
    if any(kind == "pdf" for _, _, kind in packages) and shutil.which("pdftotext") is None:
        raise ConfigError("data prepare prose: needs pdftotext for TeX Live's manuals "
                          "(`apt-get install poppler-utils`)")
    debs = fetch_debs([p for p, _, _ in packages], cache / "debs")
    (out / "packages").mkdir(parents=True, exist_ok=True)
    jobs = [(debs[pkg], keep, kind, out / "packages") for pkg, keep, kind in packages]
    with ProcessPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        # the largest first, so that no big package starts last
        futures = {j[0]: pool.submit(_package_text, j) for j in sorted(jobs, key=lambda j: -j[0].stat().st_size)}
        files = [futures[j[0]].result() for j in jobs]
    fd, tmp = tempfile.mkstemp(prefix=".prose.", dir=out)
    rows, h = [], hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for (pkg, _, _), part in zip(packages, files):
                data = part.read_bytes()
                f.write(data)
                h.update(data)
                rows.append({"package": pkg, "deb": debs[pkg].name, "deb_sha256": _sha256(debs[pkg]),
                             "files": data.count(b"\n\n\n"), "bytes": len(data), "part": part.name})
                print(f"data prepare: {pkg}: {len(data) / 1e6:.1f} MB of prose from {rows[-1]['files']} files",
                      file=sys.stderr, flush=True)
        os.replace(tmp, text)
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta = {"corpus": "prose", "extractor": EXTRACTOR, "rules_sha256": rules, "text_sha256": h.hexdigest(),
            "bytes": sum(r["bytes"] for r in rows), "packages": rows}
    write_json(manifest, meta)
    return text, meta


def pack(text: Path, tokenizer_json: Path, max_tokens: int, out_dir: Path, part_bytes: int = 24 << 20) -> dict:
    """The corpus's first lines that hold max_tokens tokens of `tokenizer_json`, xz-compressed and
    cut into parts of at most part_bytes (prose.txt.xz.000, ...), the tokenizer beside them: what a
    machine that cannot fetch the packages prepares the same shards from (docs/data.md). 24 MiB: one
    part, the wheels and the ~18 MB tree fit a device call's 64 MiB; 56 MiB parts did not."""
    import lzma

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("prose.txt.xz.*"):
        old.unlink()
    comp, h, parts, buf = lzma.LZMACompressor(preset=9), hashlib.sha256(), [], bytearray()
    n_tokens = n_bytes = 0

    def spill(final: bool) -> None:
        while len(buf) >= part_bytes or (final and buf):
            part = out_dir / f"prose.txt.xz.{len(parts):03d}"
            chunk = bytes(buf[:part_bytes])
            write_atomically(part, lambda tmp: tmp.write_bytes(chunk))
            del buf[:part_bytes]
            parts.append(part.name)

    lines = text.read_bytes().decode("utf-8").splitlines(keepends=True)
    for i in range(0, len(lines), 10_000):
        chunk = lines[i:i + 10_000]
        n_tokens += sum(len(e.ids) for e in tok.encode_batch(chunk))
        data = "".join(chunk).encode()
        h.update(data)
        n_bytes += len(data)
        buf += comp.compress(data)
        spill(False)
        if n_tokens >= max_tokens:
            break
    buf += comp.flush()
    spill(True)
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    meta = {"tokens": n_tokens, "text_bytes": n_bytes, "text_sha256": h.hexdigest(), "parts": parts,
            "packed_bytes": sum((out_dir / p).stat().st_size for p in parts)}
    write_json(out_dir / "pack.json", meta)
    return meta
