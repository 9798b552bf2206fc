"""tools/pubmed_corpus.py and medgpt/literature.py: PubMed XML and MEDLINE exports read offline, the corpus
deduplicated and counted, and the E-utilities fetch run against a stub NCBI server on loopback."""

import gzip
import importlib.util
import json
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medgpt.data import DataReport, load_records
from medgpt.errors import InputError
from medgpt.dataset_tools import Tally
from medgpt.literature import Article, build_corpus, read_articles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "data", "literature")


def load_tool():
    spec = importlib.util.spec_from_file_location("pubmed_corpus_tool", os.path.join(REPO, "tools", "pubmed_corpus.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()

DOCTYPE = ('<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" '
           '"https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">')


def journal_article(pmid, title, abstract_xml, date_xml="<Year>2024</Year>", journal="<Title>Example Journal</Title>",
                    extra=""):
    return f"""<PubmedArticle>
<MedlineCitation Status="MEDLINE" Owner="NLM">
<PMID Version="1">{pmid}</PMID>
<Article PubModel="Print">
<Journal><JournalIssue CitedMedium="Print"><PubDate>{date_xml}</PubDate></JournalIssue>{journal}</Journal>
<ArticleTitle>{title}</ArticleTitle>
{abstract_xml}
{extra}
</Article>
</MedlineCitation>
<PubmedData><ArticleIdList><ArticleId IdType="pubmed">{pmid}</ArticleId></ArticleIdList></PubmedData>
</PubmedArticle>
"""


def pubmed_xml(*articles, doctype=DOCTYPE, declaration='<?xml version="1.0" ?>'):
    return f"{declaration}\n{doctype}\n<PubmedArticleSet>\n{''.join(articles)}</PubmedArticleSet>\n"


MARKUP_ARTICLE = journal_article(
    "91000001",
    "The <i>ATP7B</i> gene &amp; copper<sup>2+</sup> transport.",
    """<Abstract>
<AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">Ceruloplasmin   &lt;0.2 g/L
   (p &lt; 0.05), doses &amp;gt; 20 mg and <b>zinc</b> with
<mml:math><mml:mi>x</mml:mi><mml:mo>=</mml:mo><mml:mn>2</mml:mn></mml:math> units.</AbstractText>
<AbstractText Label="METHODS AND RESULTS" NlmCategory="METHODS">Trientine &#x3B1; and H<sub>2</sub>O.</AbstractText>
<CopyrightInformation>&#xA9; 2024 The Authors &amp; Example Press.</CopyrightInformation>
</Abstract>""",
)
BRACKETED_ARTICLE = journal_article(
    "91000002", "[Wilson disease in children].", "<Abstract><AbstractText>Plain abstract text.</AbstractText></Abstract>",
    date_xml="<MedlineDate>1998 Dec-1999 Jan</MedlineDate>", journal="<ISOAbbreviation>Ex J</ISOAbbreviation>",
    extra="<Language>chi</Language>",
)
NO_ABSTRACT_ARTICLE = journal_article("91000003", "A letter without an abstract.", "")
BOOK_ARTICLE = """<PubmedBookArticle>
<BookDocument>
<PMID Version="1">91000004</PMID>
<Book><Publisher><PublisherName>Example</PublisherName></Publisher><BookTitle book="ex">Example Reviews</BookTitle>
<PubDate><Year>2020</Year></PubDate></Book>
<ArticleTitle part="ex">Gaucher Disease</ArticleTitle>
<Abstract><AbstractText Label="CLINICAL CHARACTERISTICS">Splenomegaly and bone disease.</AbstractText>
<CopyrightInformation>Copyright 2020 Example</CopyrightInformation></Abstract>
</BookDocument>
<PubmedBookData><ArticleIdList><ArticleId IdType="pubmed">91000004</ArticleId></ArticleIdList></PubmedBookData>
</PubmedBookArticle>
"""


def write(path, text, mode="w"):
    if "b" in mode:
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def run_tool(argv, capsys) -> tuple[int, str]:
    """main(argv) in this process: (exit status, stderr)."""
    try:
        tool.main([str(arg) for arg in argv])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    """The error report: exactly one line, the last one, after any log lines, and no traceback."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors and lines[-1] == errors[-1], stderr
    return errors


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ---- reading ----


def test_xml_fields_markup_labels_dates_and_books(tmp_path):
    path = write(tmp_path / "export.xml", pubmed_xml(MARKUP_ARTICLE, BRACKETED_ARTICLE, NO_ABSTRACT_ARTICLE, BOOK_ARTICLE))
    articles = read_articles(path)
    assert [article.pmid for article in articles] == ["91000001", "91000002", "91000003", "91000004"]
    first, bracketed, letter, book = articles

    assert first.title == "The ATP7B gene & copper2+ transport."
    assert first.abstract == (
        "Background: Ceruloplasmin <0.2 g/L (p < 0.05), doses > 20 mg and zinc with x=2 units.\n"
        "Methods and results: Trientine α and H2O."
    )
    assert first.record() == {
        "text": first.title + "\n" + first.abstract, "pmid": "91000001", "title": first.title, "year": 2024,
        "journal": "Example Journal", "copyright": "© 2024 The Authors & Example Press.",
    }
    assert first.source == f"{path}:4"

    assert bracketed.title == "Wilson disease in children."
    assert bracketed.year == 1998 and bracketed.journal == "Ex J"
    assert "copyright" not in bracketed.record()
    assert letter.abstract == "" and letter.title == "A letter without an abstract."
    assert (book.title, book.year, book.copyright) == ("Gaucher Disease", 2020, "Copyright 2020 Example")
    assert book.abstract == "Clinical characteristics: Splenomegaly and bone disease."


def test_xml_is_read_offline_without_a_declaration_or_a_bundled_dtd(tmp_path, monkeypatch):
    """Bio.Entrez downloads a DTD it does not bundle: such files are read with the newest bundled one."""
    import Bio.Entrez.Parser

    downloads = []
    monkeypatch.setattr(Bio.Entrez.Parser, "urlopen", lambda *args, **kwargs: downloads.append(args) or 1 / 0)
    future = DOCTYPE.replace("pubmed_250101.dtd", "pubmed_990101.dtd")
    cases = {
        "future.xml": pubmed_xml(MARKUP_ARTICLE, doctype="<!-- exported\n by a newer PubMed -->\n" + future),
        "no_declaration.xml": pubmed_xml(MARKUP_ARTICLE, declaration=""),
        "no_doctype.xml": pubmed_xml(MARKUP_ARTICLE, doctype=""),
        "bundled.xml": pubmed_xml(MARKUP_ARTICLE),
    }
    for name, text in cases.items():
        articles = read_articles(write(tmp_path / name, text))
        assert [(a.pmid, a.copyright) for a in articles] == [("91000001", "© 2024 The Authors & Example Press.")], name
    assert downloads == []


def test_xml_element_outside_the_dtd_is_an_error_at_its_line(tmp_path):
    unknown = journal_article("91000005", "[Not Available].", "<NewElement>x</NewElement>")
    path = write(tmp_path / "new.xml", pubmed_xml(unknown))
    with pytest.raises(InputError) as error:
        read_articles(path)
    assert str(error.value) == f"{path}:10: element <NewElement> is not in the PubMed DTD the file names"
    (article,) = read_articles(write(tmp_path / "ok.xml", pubmed_xml(journal_article("91000005", "[Not Available].", ""))))
    assert article.title == ""


def test_medline_fields_and_continuation_lines(tmp_path):
    medline = (
        "\n"
        "PMID- 92000001\n"
        "OWN - NLM\n"
        "DP  - 1998 Dec-1999 Jan\n"
        "TI  - A title that wraps\n"
        "      onto a second line.\n"
        "AB  - BACKGROUND: First part that\n"
        "      continues here.  RESULTS: Doses &lt;5 mg\n"
        "      were used. CONCLUSIONS AND RELEVANCE: Done.\n"
        "CI  - (c) 2020 Example\n"
        "      Press.\n"
        "TA  - Example J\n"
        "\n"
        "PMID- 92000002\r\n"
        "TI  - [Translated title].\r\n"
        "AB  - Plain abstract, HIV: not a label.\r\n"
        "JT  - Full Journal Title\r\n"
        "TA  - Abbrev\r\n"
        "PT  - Journal Article\r\n"
        "PT  - Retracted Publication\r\n"
    )
    first, second = read_articles(write(tmp_path / "pubmed-set.txt", medline))
    assert first.record() == {
        "text": "A title that wraps onto a second line.\nBackground: First part that continues here.\n"
                "Results: Doses <5 mg were used.\nConclusions and relevance: Done.",
        "pmid": "92000001", "title": "A title that wraps onto a second line.", "year": 1998,
        "journal": "Example J", "copyright": "(c) 2020 Example Press.",
    }
    assert first.source.endswith("pubmed-set.txt:2")
    assert (second.pmid, second.title, second.abstract) == ("92000002", "Translated title.", "Plain abstract, HIV: not a label.")
    assert second.journal == "Full Journal Title" and second.year is None and second.retracted
    assert second.source.endswith(":14")


def test_format_is_read_from_the_content_and_gzip_is_unpacked(tmp_path):
    medline = "PMID- 92000003\nTI  - Title.\nAB  - Abstract.\n"
    xml_named_txt = write(tmp_path / "download.txt", pubmed_xml(BRACKETED_ARTICLE))
    medline_named_xml = write(tmp_path / "download.xml", medline)
    gzipped = write(tmp_path / "export.xml.gz", gzip.compress(pubmed_xml(MARKUP_ARTICLE).encode()), "wb")
    assert [a.pmid for a in read_articles(xml_named_txt)] == ["91000002"]
    assert [a.pmid for a in read_articles(medline_named_xml)] == ["92000003"]
    assert [a.pmid for a in read_articles(gzipped)] == ["91000001"]


def test_dedup_and_drops_are_counted_by_reason():
    def article(pmid, abstract, title="T", retracted=False):
        return Article(pmid=pmid, title=title, abstract=abstract, source=f"f.xml:{pmid}", retracted=retracted)

    articles = [
        article("1", "Alpha text."),
        article("2", ""),  # no abstract
        article("1", "Another text with the same PMID."),  # duplicate PMID: first kept
        article("3", "Alpha  text."),  # same text as 1 once whitespace is normalised
        article("4", "alpha TEXT.", title="t"),  # and once case is ignored
        article("5", "Retracted findings.", retracted=True),
        article("", "No identifier."),
        article("6", "Beta text."),
    ]
    report = Tally("test", unit="articles")
    records = build_corpus(articles, report)
    assert [record["pmid"] for record in records] == ["1", "6"]
    assert records[0]["text"] == "T\nAlpha text."
    assert (report.read, report.kept) == (8, 2)
    assert report.dropped == {"no abstract": 1, "duplicate PMID": 1, "duplicate text": 2,
                               "retracted publication": 1, "no PMID": 1}
    assert report.examples["duplicate text"] == "f.xml:3"
    kept_retracted = build_corpus(articles, Tally("test", unit="articles"), drop_retracted=False)
    assert [record["pmid"] for record in kept_retracted] == ["1", "5", "6"]


# ---- the shipped samples, through the tool ----


def test_shipped_samples_become_a_corpus_that_trains(tmp_path, capsys):
    xml_articles = read_articles(os.path.join(SAMPLES, "sample_pubmed.xml"))
    medline_articles = read_articles(os.path.join(SAMPLES, "sample_medline.txt"))
    assert len(xml_articles) == 9 and len(medline_articles) == 4
    assert all(article.pmid.startswith("900000") for article in xml_articles + medline_articles)

    output = tmp_path / "corpus" / "pubmed.jsonl"
    status, stderr = run_tool(["--input", os.path.join(SAMPLES, "sample_pubmed.xml"),
                               os.path.join(SAMPLES, "sample_medline.txt"), "--output_file", output], capsys)
    assert status == 0, stderr
    records = read_jsonl(output)
    assert [record["pmid"] for record in records] == [
        "90000001", "90000002", "90000003", "90000004", "90000005", "90000006", "90000007", "90000008",
        "90000011", "90000012", "90000013",
    ]
    by_pmid = {record["pmid"]: record for record in records}
    assert by_pmid["90000001"]["text"].split("\n")[1].startswith("Purpose of review: Wilson disease")
    assert len(by_pmid["90000001"]["text"].split("\n")) == 4  # title + three labelled sections
    assert "α-galactosidase A" in by_pmid["90000003"]["text"] and "<60 mL/min/1.73 m2" in by_pmid["90000003"]["text"]
    assert "<i>" not in by_pmid["90000008"]["text"] and "FEV1" in by_pmid["90000008"]["text"]
    assert by_pmid["90000004"]["copyright"].startswith("© 2024 The Authors.")
    assert by_pmid["90000011"]["copyright"].startswith("Copyright (c) 2022")
    assert "copyright" not in by_pmid["90000002"]
    assert by_pmid["90000005"]["year"] == 2019
    assert by_pmid["90000006"]["title"] == "Newborn screening and dietary treatment of phenylketonuria."
    assert by_pmid["90000013"]["journal"].startswith("Zhongguo shili neike zazhi")
    for record in records:
        words = len(record["text"].split("\n", 1)[1].split())
        assert 80 <= words <= 200, (record["pmid"], words)
    log = stderr
    assert "read 13 articles, kept 11, dropped 2" in log
    assert "dropped 1 x no abstract (first at " + os.path.join(SAMPLES, "sample_pubmed.xml") + ":" in log
    assert "dropped 1 x duplicate PMID" in log and "licence: PubMed abstracts are copyrighted" in log

    # The pretraining loader reads it: the extra keys do not get in the way.
    trained = load_records(str(output.parent), "text", DataReport("train"), skip_invalid=False)
    assert [record["text"] for record in trained] == [record["text"] for record in records]


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    output = tmp_path / "pubmed.jsonl"
    output.write_text('{"text": "earlier results"}\n', encoding="utf-8")
    sample = os.path.join(SAMPLES, "sample_medline.txt")
    status, stderr = run_tool(["--input", sample, "--output_file", output], capsys)
    assert status == 2
    assert error_lines(stderr) == [f"error: {output}: --output_file already holds results: pass --overwrite True to replace them"]
    assert output.read_text(encoding="utf-8") == '{"text": "earlier results"}\n'
    status, stderr = run_tool(["--input", sample, "--output_file", output, "--overwrite", "True"], capsys)
    assert status == 0, stderr
    assert [record["pmid"] for record in read_jsonl(output)] == ["90000011", "90000012", "90000007", "90000013"]


def test_truncated_xml_is_an_error_at_its_line(tmp_path, capsys):
    with open(os.path.join(SAMPLES, "sample_pubmed.xml"), encoding="utf-8") as handle:
        text = handle.read()
    truncated = text[: text.index("Gb<sub>3</sub>") + 20]
    path = write(tmp_path / "cut.xml", truncated)
    status, stderr = run_tool(["--input", path, "--output_file", tmp_path / "out.jsonl"], capsys)
    assert status == 2
    lines = error_lines(stderr)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {path}:{truncated.count(chr(10)) + 1}: malformed XML: ")
    assert lines[0].endswith("(is the file truncated?)")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("content, message", [
    ("", "no PubMed records in this file"),
    ("\n\n", "no PubMed records in this file"),
    ("Patient notes\nnothing to see\n", "1: not a MEDLINE field line: 'Patient notes'"),
    ("PMID- 1\nTI  - ok\nthis is prose\n", "3: not a MEDLINE field line: 'this is prose'"),
    ("      indented first\n", "1: continuation line with no field before it"),
])
def test_empty_or_garbage_medline_is_a_clear_error(tmp_path, content, message):
    path = write(tmp_path / "export.txt", content)
    with pytest.raises(InputError) as error:
        read_articles(path)
    assert str(error.value).startswith(f"{path}:{message}" if message[0].isdigit() else f"{path}: {message}")


def test_other_xml_and_bad_bytes_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match=r"not a PubMed XML file: the root element is <eSearchResult>"):
        read_articles(write(tmp_path / "search.xml", '<?xml version="1.0"?>\n<eSearchResult><Count>1</Count></eSearchResult>'))
    with pytest.raises(InputError, match=r"export.txt:2: not valid UTF-8"):
        read_articles(write(tmp_path / "export.txt", b"PMID- 1\nTI  - \xff\xfe\n", "wb"))
    with pytest.raises(InputError, match=r"damaged or truncated gzip"):
        read_articles(write(tmp_path / "x.xml.gz", gzip.compress(b"<PubmedArticleSet/>")[:12], "wb"))


def test_medline_records_without_a_blank_line_between_them_stay_apart(tmp_path):
    first, second = read_articles(write(tmp_path / "run-together.txt", (
        "PMID- 92000011\nTI  - First title.\nAB  - First abstract.\n"
        "PMID- 92000012\nTI  - Second title.\nAB  - Second abstract.\n")))
    assert (first.pmid, first.title, first.abstract) == ("92000011", "First title.", "First abstract.")
    assert (second.pmid, second.abstract, second.source.rsplit(":", 1)[1]) == ("92000012", "Second abstract.", "4")


def test_only_whole_entities_are_decoded_and_a_record_without_its_citation_is_an_error(tmp_path):
    article = journal_article("91000021", "Signs &amp;para; and &amp;not words", "<Abstract><AbstractText>"
                              "Sodium &amp;lt;135 mmol/L &amp;para 2.</AbstractText></Abstract>")
    (parsed,) = read_articles(write(tmp_path / "entities.xml", pubmed_xml(article)))
    assert parsed.title == "Signs ¶ and &not words"
    assert parsed.abstract == "Sodium <135 mmol/L &para 2."
    broken = pubmed_xml(MARKUP_ARTICLE, "<PubmedArticle><PubmedData></PubmedData></PubmedArticle>\n")
    path = write(tmp_path / "no-citation.xml", broken)
    line = broken.split("\n").index("<PubmedArticle><PubmedData></PubmedData></PubmedArticle>") + 1
    with pytest.raises(InputError, match=rf"no-citation.xml:{line}: a PubmedArticle without MedlineCitation"):
        read_articles(path)


# ---- fetching from a stub E-utilities server ----

FETCH_IDS = [f"9300000{n}" for n in range(1, 6)]


def fetched_article(pmid):
    return journal_article(pmid, f"Fetched article {pmid}.",
                           f"<Abstract><AbstractText>Abstract of record {pmid} about gene therapy.</AbstractText></Abstract>")


class StubEutils:
    """esearch and efetch as NCBI answers them (XML), counting requests; efetch_status makes efetch fail."""

    def __init__(self):
        self.requests = []
        self.efetch_status = 200
        self.efetch_cut_offs = 0  # this many efetch answers end halfway
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.answer(urllib.parse.urlsplit(self.path).query)

            def do_POST(self):
                self.answer(self.rfile.read(int(self.headers["Content-Length"])).decode())

            def answer(self, query):
                params = {key: values[0] for key, values in urllib.parse.parse_qs(query).items()}
                tool_name = urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[-1]
                stub.requests.append((tool_name, params))
                if tool_name == "esearch.fcgi":
                    ids = FETCH_IDS[: int(params.get("retmax", 20))]
                    body = ('<?xml version="1.0" encoding="UTF-8" ?>\n<!DOCTYPE eSearchResult PUBLIC "-//NLM//DTD '
                            'esearch 20060628//EN" "https://eutils.ncbi.nlm.nih.gov/eutils/dtd/20060628/esearch.dtd">\n'
                            f"<eSearchResult><Count>{len(FETCH_IDS)}</Count><RetMax>{len(ids)}</RetMax>"
                            f"<RetStart>0</RetStart><IdList>{''.join(f'<Id>{i}</Id>' for i in ids)}</IdList>"
                            f"<TranslationSet/><QueryTranslation>{params['term']}</QueryTranslation></eSearchResult>")
                    status = 200
                elif tool_name == "efetch.fcgi":
                    status = stub.efetch_status
                    body = pubmed_xml(*(fetched_article(pmid) for pmid in params["id"].split(",")))
                    if stub.efetch_cut_offs:
                        stub.efetch_cut_offs -= 1
                        body = body[: len(body) // 2]
                else:
                    status, body = 404, "unknown"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def efetch_ids(self):
        return [params["id"].split(",") for name, params in self.requests if name == "efetch.fcgi"]

    def count(self, name):
        return sum(1 for tool_name, _ in self.requests if tool_name == name)


@pytest.fixture
def eutils(monkeypatch):
    """Biopython's E-utilities requests sent to the stub: Bio.Entrez.urlopen, the one call that reaches the
    network, gets each request with its NCBI address replaced by the stub's (rate limiting, parameters and
    request building stay Biopython's own)."""
    from urllib.request import urlopen

    from Bio import Entrez

    stub = StubEutils()
    ncbi = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils/"

    def to_stub(request, *args, **kwargs):
        assert request.full_url.startswith(ncbi), request.full_url
        request.full_url = f"http://127.0.0.1:{stub.server.server_port}/" + request.full_url[len(ncbi):]
        return urlopen(request, *args, **kwargs)

    monkeypatch.setattr(Entrez, "urlopen", to_stub)
    monkeypatch.delenv("NCBI_EMAIL", raising=False)
    monkeypatch.delenv("NCBI_API_KEY", raising=False)
    yield stub
    stub.server.shutdown()
    stub.server.server_close()


def fetch_argv(tmp_path, query="rare disease AND gene therapy", *extra):
    return ["--query", query, "--email", "tester@example.org", "--max_records", "5", "--batch_size", "2",
            "--download_dir", tmp_path / "download", "--output_file", tmp_path / "fetched.jsonl",
            "--retry_wait", "0", *extra]


def test_fetch_in_batches_then_resume_only_the_missing_one(tmp_path, capsys, eutils, monkeypatch):
    from Bio import Entrez

    status, stderr = run_tool(fetch_argv(tmp_path), capsys)
    assert status == 0, stderr
    download = tmp_path / "download"
    assert sorted(os.listdir(download)) == ["batch_00000.xml", "batch_00001.xml", "batch_00002.xml", "search.json"]
    assert eutils.count("esearch.fcgi") == 1
    assert eutils.efetch_ids() == [FETCH_IDS[0:2], FETCH_IDS[2:4], FETCH_IDS[4:5]]
    search_params = eutils.requests[0][1]
    assert (search_params["db"], search_params["term"], search_params["retmax"]) == ("pubmed", "rare disease AND gene therapy", "5")
    assert all(params["email"] == "tester@example.org" and "api_key" not in params for _, params in eutils.requests)
    assert all(params["retmode"] == "xml" for name, params in eutils.requests if name == "efetch.fcgi")
    state = json.loads((download / "search.json").read_text(encoding="utf-8"))
    assert (state["query"], state["count"], state["ids"]) == ("rare disease AND gene therapy", 5, FETCH_IDS)
    # Each batch is the server's answer as it came.
    assert (download / "batch_00001.xml").read_text(encoding="utf-8") == pubmed_xml(*map(fetched_article, FETCH_IDS[2:4]))
    records = read_jsonl(tmp_path / "fetched.jsonl")
    assert [record["pmid"] for record in records] == FETCH_IDS
    assert records[0] == {"text": f"Fetched article {FETCH_IDS[0]}.\nAbstract of record {FETCH_IDS[0]} about gene therapy.",
                          "pmid": FETCH_IDS[0], "title": f"Fetched article {FETCH_IDS[0]}.", "year": 2024,
                          "journal": "Example Journal"}
    assert Entrez.email is None and Entrez.max_tries == 3  # Biopython's settings are restored

    os.remove(download / "batch_00001.xml")
    eutils.requests.clear()
    monkeypatch.setenv("NCBI_EMAIL", "from-env@example.org")
    monkeypatch.setenv("NCBI_API_KEY", "key123")
    argv = fetch_argv(tmp_path, "rare disease AND gene therapy", "--overwrite", "True")
    del argv[2:4]  # the e-mail address from $NCBI_EMAIL
    status, stderr = run_tool(argv, capsys)
    assert status == 0, stderr
    assert eutils.count("esearch.fcgi") == 0
    assert eutils.efetch_ids() == [FETCH_IDS[2:4]]
    assert (eutils.requests[0][1]["email"], eutils.requests[0][1]["api_key"]) == ("from-env@example.org", "key123")
    assert "key123" not in (download / "search.json").read_text(encoding="utf-8") + stderr
    assert [record["pmid"] for record in read_jsonl(tmp_path / "fetched.jsonl")] == FETCH_IDS


def test_fetch_server_errors_are_retried_then_one_line(tmp_path, capsys, eutils):
    eutils.efetch_status = 500
    status, stderr = run_tool(fetch_argv(tmp_path, "rare disease AND gene therapy", "--max_tries", "3"), capsys)
    assert status == 2
    assert eutils.count("efetch.fcgi") == 3 and eutils.efetch_ids() == [FETCH_IDS[0:2]] * 3
    assert len(error_lines(stderr)) == 1
    assert error_lines(stderr)[0].startswith(f"error: {tmp_path / 'download'}: efetch of batch 0 (records 1-2) failed 3 times, "
                             "last with HTTP 500 ")
    assert "rerun the same command" in stderr
    assert sorted(os.listdir(tmp_path / "download")) == ["search.json"]
    assert not (tmp_path / "fetched.jsonl").exists()

    eutils.requests.clear()
    eutils.efetch_status = 400  # a refused request is not retried
    status, stderr = run_tool(fetch_argv(tmp_path, "rare disease AND gene therapy", "--max_tries", "3"), capsys)
    assert status == 2 and eutils.count("efetch.fcgi") == 1
    assert "HTTP 400" in stderr and "not retried" in stderr


def test_fetch_retries_an_answer_cut_off_halfway(tmp_path, capsys, eutils):
    eutils.efetch_cut_offs = 1
    status, stderr = run_tool(fetch_argv(tmp_path), capsys)
    assert status == 0, stderr
    assert eutils.efetch_ids() == [FETCH_IDS[0:2], FETCH_IDS[0:2], FETCH_IDS[2:4], FETCH_IDS[4:5]]
    assert "efetch of batch 0 (records 1-2) failed (BadResponse: unusable answer (malformed XML" in stderr
    assert [record["pmid"] for record in read_jsonl(tmp_path / "fetched.jsonl")] == FETCH_IDS


def test_fetch_refuses_another_query_in_the_same_folder_and_needs_an_email(tmp_path, capsys, eutils):
    status, stderr = run_tool(fetch_argv(tmp_path), capsys)
    assert status == 0, stderr
    eutils.requests.clear()
    status, stderr = run_tool(fetch_argv(tmp_path, "Fabry disease", "--overwrite", "True"), capsys)
    assert status == 2 and eutils.requests == []
    assert error_lines(stderr) == [(f"error: {tmp_path / 'download' / 'search.json'}: --download_dir holds the download of "
                              "another query ('rare disease AND gene therapy'): use a new --download_dir for this one")]

    argv = fetch_argv(tmp_path, "Fabry disease")
    del argv[2:4]  # no --email
    status, stderr = run_tool(argv, capsys)
    assert status == 2 and eutils.requests == []
    assert error_lines(stderr)[0].startswith("error: --email (or $NCBI_EMAIL) is required with --query")
