"""PubMed abstracts as pretraining text: exported files read offline, or a query fetched from NCBI.

Two export formats are read, chosen by content (XML starts with '<'), gzipped or not:

- PubMed XML (`PubmedArticleSet`, as PubMed's "Save -> XML" or efetch retmode=xml give), parsed by
  `Bio.Entrez.read` against the DTDs Biopython bundles. A file naming a DTD version Biopython does not have
  would make it download that DTD: such files are read with the newest bundled PubMed DTD instead (without
  validation, since the newer DTD may allow elements the older one lacks), so reading never touches the network.
- MEDLINE text (PubMed's "Save -> PubMed format": `PMID- `, `TI  - `, `AB  - `, six-space continuation
  lines), parsed record by record by `Bio.Medline`.

Each article becomes `{"text": title + newline + abstract, "pmid", "title", "year"}`, plus `"journal"` and
`"copyright"` when it has them. Articles without an abstract, retracted ones, repeated PMIDs (the first is
kept) and repeated texts are dropped and counted by reason.

`fetch_pubmed` runs a query through NCBI's E-utilities (Biopython's `Entrez`): one esearch, whose id list is
kept in the download folder, then one efetch per batch, each saved as raw XML under a temporary name and
renamed when complete, so a rerun fetches only the batches still missing.
"""

import contextlib
import gzip
import html
import http.client
import json
import logging
import os
import re
import socket
import time
import zlib
from dataclasses import dataclass
from io import BytesIO
from urllib.error import HTTPError, URLError

from tqdm.auto import tqdm

from medgpt.data import find_data_files
from medgpt.dataset_tools import Tally
from medgpt.errors import InputError
from medgpt.outputs import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

LICENCE_NOTE = (
    "licence: PubMed abstracts are copyrighted by their publishers and authors; NLM provides them under its "
    "terms (https://www.nlm.nih.gov/databases/download/terms_and_conditions.html): check them before "
    "redistributing a corpus built from them (each record keeps its copyright statement in 'copyright')"
)

# What a folder given as input is searched for (a file named explicitly is read whatever its name):
# PubMed's XML and "PubMed format" exports (.txt; .nbib and .medline from citation managers), gzipped too.
PUBMED_SUFFIXES = (".xml", ".xml.gz", ".txt", ".txt.gz", ".nbib", ".medline")

# ---- cleaning ----

TAG = re.compile(r"<[^<>]*>")
# MathML's annotations repeat the formula in another notation (TeX, content MathML): keep one copy.
MATH_ANNOTATION = re.compile(r"<annotation(?:-xml)?\b[^>]*>.*?</annotation(?:-xml)?>", re.DOTALL)
WHOLE_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
YEAR = re.compile(r"\b(1[89]\d\d|2[01]\d\d)\b")


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def clean_text(value, escaped: bool) -> str:
    """Plain text: inline markup (<i>, <sup>, MathML ...) removed keeping its text, HTML entities decoded,
    whitespace collapsed. `escaped`: the text comes from Bio.Entrez read with escape=True, where element
    markup is left as tags and the text's own '<' and '&' are escaped, so every tag can be removed without
    touching a 'p < 0.05'; one unescape undoes that, the other decodes entities the source itself carried
    (PubMed records sometimes hold a double-escaped '&amp;lt;')."""
    text = "" if value is None else str(value)
    if escaped:
        text = html.unescape(TAG.sub("", MATH_ANNOTATION.sub("", text)))
        # Only entities written whole (with their ';'): html.unescape alone would also turn text such as
        # "&para" or "&not" into symbols.
        return normalise_whitespace(WHOLE_ENTITY.sub(lambda entity: html.unescape(entity.group()), text))
    return normalise_whitespace(html.unescape(text))


def section_label(label: str) -> str:
    """PubMed's upper-case section labels as in prose: BACKGROUND -> Background."""
    label = normalise_whitespace(label).rstrip(":")
    return label.capitalize() if label.isupper() else label


def untranslated_title(title: str) -> str:
    """PubMed encloses the English translation of a non-English title in square brackets: drop them.
    '[Not Available].' stands for no title at all."""
    if title.rstrip(".") == "[Not Available]":
        return ""
    if title.startswith("[") and (title.endswith("]") or title.endswith("].")):
        inner = title[1:title.rindex("]")].strip()
        if "[" not in inner and "]" not in inner:
            return inner + ("." if title.endswith(".") and not inner.endswith((".", "?", "!")) else "")
    return title


def first_year(*values) -> int | None:
    for value in values:
        found = YEAR.search(str(value or ""))
        if found:
            return int(found.group(1))
    return None


# ---- articles ----


@dataclass
class Article:
    pmid: str
    title: str
    abstract: str
    year: int | None = None
    journal: str | None = None
    copyright: str | None = None
    retracted: bool = False
    source: str = ""

    @property
    def text(self) -> str:
        return f"{self.title}\n{self.abstract}" if self.title else self.abstract

    def record(self) -> dict:
        record = {"text": self.text, "pmid": self.pmid, "title": self.title, "year": self.year}
        if self.journal:
            record["journal"] = self.journal
        if self.copyright:
            record["copyright"] = self.copyright
        return record


def read_input(path: str) -> bytes:
    """A file's bytes, gunzipped when it is gzip data (whatever its name)."""
    try:
        with open(path, "rb") as handle:
            content = handle.read()
    except OSError as error:
        raise InputError(f"cannot read: {error.strerror}", path) from None
    if content[:2] == b"\x1f\x8b":
        try:
            content = gzip.decompress(content)
        except (OSError, EOFError, zlib.error) as error:
            raise InputError(f"damaged or truncated gzip file ({error})", path) from None
    return content


def is_xml(content: bytes) -> bool:
    return content.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"<")


def read_articles(path: str) -> list[Article]:
    """Every article in one PubMed XML or MEDLINE file."""
    content = read_input(path)
    return read_pubmed_xml(path, content) if is_xml(content) else read_medline(path, content)


def pubmed_files(paths: list[str]) -> list[str]:
    """Files named, and PubMed exports found below folders named, in the order given."""
    files = []
    for path in paths:
        files += find_data_files(path, PUBMED_SUFFIXES)
    return files


# ---- PubMed XML ----

XML_DECLARATION = re.compile(rb"<\?xml[^>]*\?>")
DOCTYPE = re.compile(
    rb"<!DOCTYPE\s+(?P<root>[\w.:-]+)\s+(?:PUBLIC\s+(?P<q1>[\"'])(?P<public>.*?)(?P=q1)\s+|SYSTEM\s+)"
    rb"(?P<q2>[\"'])(?P<system>.*?)(?P=q2)\s*>",
    re.DOTALL,
)
FIRST_ELEMENT = re.compile(rb"<([A-Za-z_][\w.:-]*)")
COMMENT = re.compile(rb"<!--.*?-->", re.DOTALL)
ARTICLE_START = re.compile(rb"<(PubmedArticle|PubmedBookArticle)[\s>]")
PUBMED_ROOT = "PubmedArticleSet"


def _dtd_folders() -> list[str]:
    from Bio.Entrez.Parser import DataHandler

    return [folder for folder in (DataHandler.local_dtd_dir, DataHandler.global_dtd_dir) if folder]


def newest_pubmed_dtd() -> str:
    """The newest PubMed DTD Biopython bundles (pubmed_YYMMDD.dtd: the names sort by date)."""
    from Bio.Entrez.Parser import DataHandler

    names = [name for name in os.listdir(DataHandler.global_dtd_dir) if re.fullmatch(r"pubmed_\d{6}\.dtd", name)]
    return max(names)


def has_local_dtd(system_id: str) -> bool:
    name = os.path.basename(system_id)
    return any(os.path.isfile(os.path.join(folder, name)) for folder in _dtd_folders())


def offline_prolog(path: str, content: bytes) -> tuple[bytes, bool]:
    """The XML with a prolog Bio.Entrez can read offline, on the same lines as the original (so parser
    errors point at the user's lines), and whether to validate. Bio.Entrez needs an XML declaration (it sets
    up its handlers there) and a DTD it has locally: the declaration is added when missing, and a missing
    or unbundled DTD is replaced by the newest bundled PubMed DTD, read without validation."""
    content = content.removeprefix(b"\xef\xbb\xbf")
    body = content.lstrip()
    newlines = b"\n" * content[: len(content) - len(body)].count(b"\n")
    declaration = XML_DECLARATION.match(body)
    if declaration:
        head, body = body[: declaration.end()], body[declaration.end():]
    else:
        head = b'<?xml version="1.0" encoding="UTF-8"?>'
    body = newlines + body
    prolog = COMMENT.sub(b"", body[:20000])
    root = FIRST_ELEMENT.search(prolog)
    root = root.group(1).decode("ascii", "replace") if root else None
    if root != PUBMED_ROOT:
        found = f"the root element is <{root}>" if root else "no XML element found"
        raise InputError(f"not a PubMed XML file: {found}, expected <{PUBMED_ROOT}> (PubMed's 'Save -> XML' "
                         "or efetch retmode=xml)", path)
    newest = newest_pubmed_dtd()
    replacement = (f'<!DOCTYPE {PUBMED_ROOT} PUBLIC "-//NLM//DTD PubMedArticle//EN" '
                   f'"https://dtd.nlm.nih.gov/ncbi/pubmed/out/{newest}">').encode()
    doctype = DOCTYPE.search(body, 0, 20000)
    if doctype is None:
        logger.warning("%s: no DOCTYPE: read with Biopython's %s, without validation", path, newest)
        return head + replacement + body, False
    system_id = doctype.group("system").decode("utf-8", "replace")
    if has_local_dtd(system_id):
        return head + body, True
    logger.warning("%s: Biopython has no copy of %s: read with its %s instead, without validation", path,
                   os.path.basename(system_id), newest)
    start, end = doctype.span()
    # Kept on the lines the original DOCTYPE spanned.
    spacer = b"\n" * body[start:end].count(b"\n")
    return head + body[:start] + replacement + spacer + body[end:], False


def line_of(content: bytes, position: int) -> int:
    return content.count(b"\n", 0, position) + 1


def _xml_error(path: str, content: bytes, error: Exception) -> InputError:
    from xml.parsers import expat

    from Bio.Entrez.Parser import CorruptedXMLError, NotXMLError, ValidationError

    if isinstance(error, (CorruptedXMLError, NotXMLError)):
        cause = error.msg
        if isinstance(cause, expat.ExpatError):
            what = expat.errors.messages.get(cause.code, str(cause))
            hint = " (is the file truncated?)" if cause.lineno >= content.count(b"\n") else ""
            return InputError(f"malformed XML: {what} at column {cause.offset + 1}{hint}", path, cause.lineno)
        return InputError(f"malformed XML: {cause}", path)
    if isinstance(error, ValidationError):
        found = re.search(rb"<" + re.escape(error.name.encode()) + rb"[\s>/]", content)
        return InputError(f"element <{error.name}> is not in the PubMed DTD the file names", path,
                          line_of(content, found.start()) if found else None)
    # Bio.Entrez raises RuntimeError for an <ERROR> element in NCBI's answer, ValueError for data it cannot map.
    message = normalise_whitespace(str(error)) or type(error).__name__
    return InputError(f"cannot read as PubMed XML: {message}", path)


def read_pubmed_xml(path: str, content: bytes) -> list[Article]:
    from Bio import Entrez

    content, validate = offline_prolog(path, content)
    try:
        parsed = Entrez.read(BytesIO(content), validate=validate, escape=True)
    except (ValueError, RuntimeError) as error:
        raise _xml_error(path, content, error) from None
    # Bio.Entrez gives journal and book articles as two lists; the file's order is recovered from positions.
    starts = {"PubmedArticle": [], "PubmedBookArticle": []}
    line, counted = 1, 0
    for found in ARTICLE_START.finditer(content):
        line += content.count(b"\n", counted, found.start())
        counted = found.start()
        starts[found.group(1).decode()].append(line)
    articles = []
    for kind, convert in (("PubmedArticle", _journal_article), ("PubmedBookArticle", _book_article)):
        for index, element in enumerate(parsed.get(kind, [])):
            line = starts[kind][index] if index < len(starts[kind]) else "?"
            try:
                article = convert(element, f"{path}:{line}")
            except KeyError as missing:  # the element without the part every PubMed record has
                raise InputError(f"a {kind} without {missing.args[0]}: not a PubMed record", path,
                                 line if isinstance(line, int) else None) from None
            articles.append((line if isinstance(line, int) else 0, article))
    articles.sort(key=lambda pair: pair[0])
    return [article for _, article in articles]


def _abstract_text(abstract) -> str:
    """An abstract's sections, each on its own line, labelled ones as 'Label: text'."""
    sections = []
    for section in (abstract or {}).get("AbstractText", []):
        text = clean_text(section, escaped=True)
        if not text:
            continue
        label = getattr(section, "attributes", {}).get("Label", "")
        label = section_label(clean_text(label, escaped=True)) if label else ""
        sections.append(f"{label}: {text}" if label else text)
    return "\n".join(sections)


def _copyright(abstract) -> str | None:
    statement = clean_text((abstract or {}).get("CopyrightInformation"), escaped=True)
    return statement or None


def _journal_article(element, source: str) -> Article:
    citation = element["MedlineCitation"]
    article = citation.get("Article", {})
    journal = article.get("Journal", {})
    pub_date = journal.get("JournalIssue", {}).get("PubDate", {})
    article_dates = article.get("ArticleDate", [])
    year = first_year(pub_date.get("Year"), pub_date.get("MedlineDate"),
                      *(date.get("Year") for date in article_dates))
    types = {clean_text(kind, escaped=True) for kind in article.get("PublicationTypeList", [])}
    abstract = article.get("Abstract")
    return Article(
        pmid=clean_text(citation.get("PMID"), escaped=True),
        title=untranslated_title(clean_text(article.get("ArticleTitle"), escaped=True)),
        abstract=_abstract_text(abstract),
        year=year,
        journal=clean_text(journal.get("Title") or journal.get("ISOAbbreviation"), escaped=True) or None,
        copyright=_copyright(abstract),
        retracted="Retracted Publication" in types,
        source=source,
    )


def _book_article(element, source: str) -> Article:
    document = element["BookDocument"]
    book = document.get("Book", {})
    title = document.get("ArticleTitle") or book.get("BookTitle")
    pub_date = book.get("PubDate", {})
    abstract = document.get("Abstract")
    return Article(
        pmid=clean_text(document.get("PMID"), escaped=True),
        title=untranslated_title(clean_text(title, escaped=True)),
        abstract=_abstract_text(abstract),
        year=first_year(pub_date.get("Year"), pub_date.get("MedlineDate")),
        copyright=_copyright(abstract),
        source=source,
    )


# ---- MEDLINE ("PubMed format") ----

MEDLINE_TAG_LINE = re.compile(r"[A-Z][A-Z0-9]{0,3} *-( |$)")
CONTINUATION = " " * 6
# Labels of a structured abstract, as MEDLINE writes them inside AB: "BACKGROUND: ... METHODS: ...".
MEDLINE_LABEL = re.compile(r"(?:^|(?<=[.?!)] ))([A-Z][A-Z0-9,/&' -]{2,58}[A-Z]): ")


def _medline_blocks(path: str, content: bytes):
    """Yield (first line number, lines) for each record: runs of lines between blank lines, or from one
    'PMID-' line to the next. A line that is neither a field ('TAG - value', the tag in the first four
    columns) nor a continuation is an error."""
    content = content.removeprefix(b"\xef\xbb\xbf")
    block, start = [], 0
    for number, raw in enumerate(content.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise InputError("not valid UTF-8 text (PubMed exports are UTF-8)", path, number) from None
        if not line.strip() and not line.startswith(CONTINUATION):
            if block:
                yield start, block
            block = []
            continue
        if line.startswith("PMID-") and block:  # records that no blank line separates
            yield start, block
            block = []
        if line.startswith(CONTINUATION):
            if not block:
                raise InputError("continuation line with no field before it (MEDLINE records start with "
                                 "'PMID- ')", path, number)
        elif not MEDLINE_TAG_LINE.match(line) or len(line) > 4 and line[4] != "-":
            raise InputError(f"not a MEDLINE field line: {line[:40]!r}; expected 'TAG - value' as in PubMed's "
                             "'Save -> PubMed format' (or PubMed XML)", path, number)
        if not block:
            start = number
        block.append(line + "\n")
    if block:
        yield start, block


def medline_abstract(text: str) -> str:
    """A MEDLINE abstract; a structured one (starting with an upper-case label) as one 'Label: text' line
    per section, as XML abstracts are written."""
    text = normalise_whitespace(html.unescape(text))
    if not MEDLINE_LABEL.match(text):
        return text
    found = list(MEDLINE_LABEL.finditer(text))
    sections = []
    for index, label in enumerate(found):
        end = found[index + 1].start() if index + 1 < len(found) else len(text)
        body = text[label.end():end].strip()
        if body:
            sections.append(f"{section_label(label.group(1))}: {body}")
    return "\n".join(sections)


def _joined(value) -> str:
    if isinstance(value, list):
        value = " ".join(value)
    return normalise_whitespace(html.unescape(value or ""))


def read_medline(path: str, content: bytes) -> list[Article]:
    from Bio import Medline

    articles = []
    for start, lines in _medline_blocks(path, content):
        record = Medline.read(lines)
        types = set(record.get("PT", []))
        articles.append(Article(
            pmid=_joined(record.get("PMID")),
            title=untranslated_title(_joined(record.get("TI") or record.get("BTI"))),
            abstract=medline_abstract(_joined(record.get("AB"))),
            year=first_year(_joined(record.get("DP"))),
            journal=_joined(record.get("JT") or record.get("TA")) or None,
            copyright=_joined(record.get("CI")) or None,
            retracted="Retracted Publication" in types,
            source=f"{path}:{start}",
        ))
    if not articles:
        raise InputError("no PubMed records in this file (expected PubMed XML, or MEDLINE text starting with "
                         "'PMID- ')", path)
    return articles


# ---- corpus ----


def build_corpus(articles, report: Tally, drop_retracted: bool = True) -> list[dict]:
    """Pretraining records from articles in order: the first of each PMID and of each text is kept."""
    records, pmids, texts = [], set(), set()
    for article in articles:
        report.read += 1
        if not article.pmid:
            report.drop("no PMID", article.source)
            continue
        if not article.abstract:
            report.drop("no abstract", article.source)
            continue
        if drop_retracted and article.retracted:
            report.drop("retracted publication", article.source)
            continue
        if article.pmid in pmids:
            report.drop("duplicate PMID", article.source)
            continue
        text_key = normalise_whitespace(article.text).casefold()
        if text_key in texts:
            report.drop("duplicate text", article.source)
            continue
        pmids.add(article.pmid)
        texts.add(text_key)
        records.append(article.record())
    report.kept = len(records)
    return records


def articles_from_files(files: list[str]):
    for path in tqdm(files, desc="reading PubMed files", unit="file", disable=len(files) < 2):
        yield from read_articles(path)


# ---- fetching through NCBI E-utilities ----

SEARCH_STATE = "search.json"
# PubMed's esearch returns at most the first 10,000 ids of a query.
ESEARCH_LIMIT = 10000


class FetchError(InputError):
    """A request to NCBI that failed for good: reported as one line, exit status 2."""


class BadResponse(Exception):
    """An answer that arrived but cannot be used (e.g. cut-off XML): retried like a transient error."""


@dataclass
class FetchRequest:
    query: str
    email: str
    download_dir: str
    api_key: str | None = None
    max_records: int | None = None
    batch_size: int = 200
    max_tries: int = 4
    retry_wait: float = 10.0
    timeout: float = 120.0
    tool: str = "medgpt"


def batch_path(download_dir: str, index: int) -> str:
    return os.path.join(download_dir, f"batch_{index:05d}.xml")


@contextlib.contextmanager
def entrez_settings(request: FetchRequest):
    """Biopython's Entrez settings for this run, restored afterwards. Biopython's own rate limiter (in
    Entrez._open) keeps requests 0.37 s apart, 0.1 s with an API key (NCBI's 3 and 10 requests a second),
    and every try here passes through it. Its retries are turned off (max_tries = 1): it retries HTTP 5xx
    at once without a pause, and not at all when the answer breaks off while being read, so retries with
    backoff are done around the whole request instead. urllib has no timeout unless one is set globally."""
    from Bio import Entrez

    saved = (Entrez.email, Entrez.api_key, Entrez.tool, Entrez.max_tries, socket.getdefaulttimeout())
    Entrez.email, Entrez.api_key, Entrez.tool, Entrez.max_tries = request.email, request.api_key, request.tool, 1
    socket.setdefaulttimeout(request.timeout)
    try:
        yield Entrez
    finally:
        Entrez.email, Entrez.api_key, Entrez.tool, Entrez.max_tries, timeout = saved
        socket.setdefaulttimeout(timeout)


def with_retries(action, what: str, request: FetchRequest):
    """action(), retried with doubling waits after transient failures (HTTP 5xx and 429, connection
    errors, timeouts, answers cut off or malformed); a lasting failure is a FetchError."""
    problem = ""
    for attempt in range(1, request.max_tries + 1):
        try:
            return action()
        except HTTPError as error:
            problem = f"HTTP {error.code} {error.reason}"
            if error.code < 500 and error.code != 429:
                raise FetchError(f"{what} failed: {problem} (not retried: NCBI refused the request)",
                                 request.download_dir) from None
        except (URLError, OSError, http.client.HTTPException, BadResponse) as error:
            reason = getattr(error, "reason", None) or error
            problem = normalise_whitespace(f"{type(error).__name__}: {reason}")
        if attempt < request.max_tries:
            wait = request.retry_wait * 2 ** (attempt - 1)
            logger.warning("%s failed (%s), try %d of %d; retrying in %.1f s", what, problem, attempt,
                           request.max_tries, wait)
            time.sleep(wait)
    raise FetchError(f"{what} failed {request.max_tries} times, last with {problem}; rerun the same command to "
                     "fetch what is missing (complete batches are kept)", request.download_dir)


def load_search(request: FetchRequest) -> dict | None:
    """The search stored in the download folder by an earlier run of the same query, if any."""
    path = os.path.join(request.download_dir, SEARCH_STATE)
    if not os.path.exists(path):
        if any(re.fullmatch(r"batch_\d{5}\.xml", name) for name in os.listdir(request.download_dir)):
            raise InputError(f"--download_dir holds batch files but no {SEARCH_STATE}: not a download of this "
                             "tool, or a damaged one; use an empty folder", request.download_dir)
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        stored = {key: state[key] for key in ("query", "max_records", "batch_size", "ids")}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"unreadable search state ({type(error).__name__}: {error}); use a new --download_dir",
                         path) from None
    if stored["query"] != request.query:
        raise InputError(f"--download_dir holds the download of another query ({stored['query']!r}): use a new "
                         "--download_dir for this one", path)
    for name in ("max_records", "batch_size"):
        if stored[name] != getattr(request, name):
            raise InputError(f"--download_dir was filled with --{name} {stored[name]}: rerun with the same value "
                             "to resume, or use a new --download_dir", path)
    return state


def run_search(request: FetchRequest, Entrez) -> dict:
    """esearch: the query's PMIDs, stored so that every later run fetches the same records in the same
    batches. The id list is stored rather than NCBI's WebEnv/QueryKey, which expire after some hours."""
    limit = min(request.max_records or ESEARCH_LIMIT, ESEARCH_LIMIT)

    def search():
        with contextlib.closing(Entrez.esearch(db="pubmed", term=request.query, retmax=limit)) as handle:
            data = handle.read()
        try:
            return Entrez.read(BytesIO(data))
        except RuntimeError as error:  # an <ERROR> in NCBI's answer: the query itself is wrong
            raise FetchError(f"PubMed refused the query: {normalise_whitespace(str(error))}",
                             request.download_dir) from None
        except ValueError as error:
            raise BadResponse(f"malformed esearch answer: {normalise_whitespace(str(error))}") from None

    result = with_retries(search, "esearch", request)
    count, ids = int(result["Count"]), [str(pmid) for pmid in result["IdList"]][:limit]
    if not ids:
        raise InputError(f"the query matched no PubMed records: {request.query!r}")
    if count > len(ids) and request.max_records is None:
        logger.warning("the query matches %d records; PubMed's esearch gives the first %d: split the query "
                       "(e.g. by publication date) to get the rest", count, ESEARCH_LIMIT)
    state = {"database": "pubmed", "query": request.query, "max_records": request.max_records,
             "batch_size": request.batch_size, "count": count, "ids": ids,
             "searched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(os.path.join(request.download_dir, SEARCH_STATE), json.dumps(state, ensure_ascii=False, indent=1))
    return state


def fetch_batch(request: FetchRequest, Entrez, index: int, ids: list[str]) -> None:
    """efetch one batch as raw XML, checked as readable PubMed XML before it is renamed into place."""
    path = batch_path(request.download_dir, index)

    def fetch():
        with contextlib.closing(Entrez.efetch(db="pubmed", id=ids, retmode="xml")) as handle:
            data = handle.read()
        try:
            articles = read_pubmed_xml(path, data)
        except InputError as error:
            raise BadResponse(f"unusable answer ({error.message})") from None
        return data, articles

    data, articles = with_retries(fetch, f"efetch of batch {index} (records {index * request.batch_size + 1}-"
                                  f"{index * request.batch_size + len(ids)})", request)
    if len(articles) < len(ids):
        logger.warning("batch %d: NCBI returned %d of %d records (the others may have been withdrawn)", index,
                       len(articles), len(ids))
    with atomic_write(path, "wb") as stream:
        stream.write(data)


def fetch_pubmed(request: FetchRequest) -> list[str]:
    """Download the query's records into request.download_dir, reusing complete batches of an earlier run;
    the paths of every batch file, in order."""
    os.makedirs(request.download_dir, exist_ok=True)
    for name in os.listdir(request.download_dir):
        if re.fullmatch(r"\.batch_\d{5}\.xml\..*\.tmp", name):  # left by a run killed mid-write
            os.remove(os.path.join(request.download_dir, name))
    with entrez_settings(request) as Entrez:
        state = load_search(request)
        if state is None:
            state = run_search(request, Entrez)
            logger.info("PubMed: %d records match %r; fetching %d", state["count"], request.query, len(state["ids"]))
        else:
            logger.info("resuming the download of %r in %s (%d records)", request.query, request.download_dir,
                        len(state["ids"]))
        ids, size = state["ids"], request.batch_size
        batches = [ids[start:start + size] for start in range(0, len(ids), size)]
        paths = [batch_path(request.download_dir, index) for index in range(len(batches))]
        missing = [index for index, path in enumerate(paths) if not os.path.isfile(path)]
        reused = len(batches) - len(missing)
        if reused:
            logger.info("%d of %d batches already downloaded", reused, len(batches))
        for index in tqdm(missing, desc="fetching PubMed", unit="batch", disable=not missing):
            fetch_batch(request, Entrez, index, batches[index])
    return paths
