"""PDFs: pages kept, encrypted files opened as viewers open them, and pypdf run in a child
process with a deadline and a memory cap (a small hostile file can keep it busy for hours)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lmstack.docqa.documents import MAX_EXTRACTED_CHARS, Document, clean_text
from lmstack.errors import InputError

# pypdf can spend hours on a file of 2 KB (measured: 24 s a page for a content stream of a
# million operators in 17 KB; a form of 100,000 operators drawn 5,000 times, 0.8 s a drawing,
# over an hour), so PDFs are read in a child process stopped at a deadline that grows with
# the file (text-heavy PDFs read at 1-2 s per MB).
PDF_SECONDS_BASE = 30.0
PDF_SECONDS_PER_MB = 10.0
PDF_MEMORY_BYTES = 2 << 30  # the child's address space


def read_pdf(path: Path, password: str | None = None) -> Document:
    """Pages of a PDF, numbered from 1; a page without a text layer is a warning.

    Encrypted PDFs are opened with the empty user password first, as every viewer does
    (many published PDFs carry only an owner password, restricting printing or copying),
    then with `password`. The password travels to the reader on a pipe, never on a
    command line, and is neither logged nor stored.
    """
    limit = PDF_SECONDS_BASE + PDF_SECONDS_PER_MB * path.stat().st_size / 1e6
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PDF_CHILD.format(root=str(Path(__file__).parents[2]))],
            input=json.dumps({"path": str(path), "password": password}),
            capture_output=True,
            text=True,
            timeout=limit,
        )
    except subprocess.TimeoutExpired:
        raise InputError(
            f"{path}: reading the PDF took longer than the limit of {limit:.0f} s "
            f"({PDF_SECONDS_BASE:.0f} s + {PDF_SECONDS_PER_MB:.0f} s per MB); "
            "the file may be built to stall readers"
        ) from None
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise InputError(
            f"{path}: the PDF reader stopped (exit code {done.returncode}) before it finished; "
            f"the file may need more than the limit of {PDF_MEMORY_BYTES >> 30} GiB of memory"
        )
    if "error" in result:
        raise InputError(result["error"])
    texts: list[str] = result["pages"]
    if not texts:
        raise InputError(f"{path}: the PDF has no pages")
    blank = [n for n, text in enumerate(texts, 1) if not text.strip()]
    if len(blank) == len(texts):
        raise InputError(
            f"{path}: no text on any of its {len(texts)} page(s) (scanned images?); "
            "OCR is not built in"
        )
    warnings = [f"{path} page {n} has no text; OCR is not built in" for n in blank]
    pages: list[tuple[int | None, str]] = list(enumerate(texts, 1))
    title = result["title"] or path.stem
    return Document(path.name, title, pages, str(path), warnings=warnings)


# The child imports this module from where the parent found it (a checkout, or a wheel in
# site-packages, already on the path: added again in front it could shadow the stdlib).
_PDF_CHILD = (
    "import sys; root = {root!r}; root in sys.path or sys.path.insert(0, root); "
    "from lmstack.docqa.pdf import pdf_child; pdf_child()"
)


def pdf_child() -> None:
    """The reading side of read_pdf, in its own process: {"path", "password"} on stdin,
    {"title", "pages"} or {"error"} as one JSON object on stdout."""
    import logging

    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = PDF_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(hard, PDF_MEMORY_BYTES)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ImportError, ValueError, OSError):  # not a POSIX system: the deadline still holds
        pass
    logging.disable(logging.WARNING)  # pypdf logs each object it repairs
    request = json.loads(sys.stdin.read())
    path = Path(request["path"])
    try:
        result = extract_pdf(path, request["password"])
    except InputError as exc:
        result = {"error": str(exc)}
    except MemoryError:
        result = {
            "error": f"{path}: reading the PDF needs more than the limit of "
            f"{PDF_MEMORY_BYTES >> 30} GiB of memory"
        }
    sys.stdout.write(json.dumps(result))


def extract_pdf(path: Path, password: str | None = None) -> dict:
    """{"title": str or None, "pages": [text of each page]}, in this process (read_pdf runs
    it in a child with a deadline; call it directly only on trusted files)."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    number = 0
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            _decrypt(reader, path, password)
        texts: list[str] = []
        total = 0
        for number, page in enumerate(reader.pages, 1):
            # Plain mode, not "layout": layout keeps columns apart with runs of spaces but
            # interleaves the lines of two-column pages; plain mode already puts each table
            # row on its own line (measured: docs/docqa.md).
            text = clean_text(page.extract_text() or "")
            total += len(text)
            if total > MAX_EXTRACTED_CHARS:
                raise InputError(
                    f"{path}: the text passes the limit of {MAX_EXTRACTED_CHARS:,} characters "
                    f"at page {number}"
                )
            texts.append(text)
    except InputError:
        raise
    except DependencyError:
        raise InputError(
            f"{path}: the PDF is AES-encrypted, which needs the cryptography package: "
            "pip install 'lmstack[docqa]'"
        ) from None
    except Exception as exc:  # pypdf on hostile bytes raises nearly anything: unreadable
        where = f" at page {number}" if number else ""
        raise InputError(
            f"{path}: not a readable PDF{where} ({type(exc).__name__}: {exc})"
        ) from None
    return {"title": _pdf_title(reader), "pages": texts}


def _pdf_title(reader) -> str | None:
    try:
        title = reader.metadata.title if reader.metadata else None
    except Exception:  # a broken information dictionary costs the title, not the text
        return None
    return clean_text(str(title)).strip() or None if title else None


def _decrypt(reader, path: Path, password: str | None) -> None:
    from pypdf import PasswordType

    try:
        if reader.decrypt("") != PasswordType.NOT_DECRYPTED:
            return
        if password is None:
            raise InputError(
                f"{path}: the PDF needs a password to open: give it with --pdf-password "
                "(in an upload, the pdf_password field)"
            )
        if reader.decrypt(password) == PasswordType.NOT_DECRYPTED:
            raise InputError(f"{path}: the password given (--pdf-password) does not open this PDF")
    except NotImplementedError as exc:  # an encryption handler other than the standard one
        raise InputError(
            f"{path}: the PDF's encryption is not supported by pypdf ({exc})"
        ) from None
