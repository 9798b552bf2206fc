"""PubMed abstracts -> a pretraining corpus (JSON lines of {"text", "pmid", "title", "year", ...}).

From files exported from PubMed (XML, or "PubMed format" MEDLINE text; gzipped too; folders are searched):

    python tools/pubmed_corpus.py --input data/literature/sample_pubmed.xml data/literature/sample_medline.txt \
        --output_file outputs/literature/pubmed.jsonl

From a PubMed query, through NCBI's E-utilities (rerun the same command to resume an interrupted download):

    python tools/pubmed_corpus.py --query "rare disease AND gene therapy" --email you@example.org \
        --max_records 2000 --download_dir outputs/literature/gene_therapy --output_file outputs/literature/gene_therapy.jsonl

Then train on it: `python pretraining.py --train_file_dir outputs/literature ...` reads the "text" field.
PubMed abstracts are copyrighted by their publishers and authors: check NLM's terms before sharing a corpus.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the medgpt package beside tools/

from medgpt.arguments import at_least, parse_args, require, setup_logging  # noqa: E402
from medgpt.errors import InputError, exit_on_input_error  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class PubmedCorpusArguments:
    output_file: str | None = field(default=None, metadata={"help": "The JSONL corpus to write."})
    input: list[str] = field(default_factory=list, metadata={
        "help": "PubMed XML or MEDLINE ('PubMed format') files, .gz too, and/or folders searched for "
                ".xml/.txt/.nbib/.medline files; the format is read from the content."})
    query: str | None = field(default=None, metadata={
        "help": "Fetch the records of this PubMed query from NCBI E-utilities (needs --email and --download_dir)."})
    email: str | None = field(default=None, metadata={
        "help": "Your e-mail address, which NCBI asks every E-utilities user to send; default: $NCBI_EMAIL."})
    api_key: str | None = field(default=None, metadata={
        "help": "NCBI API key (10 requests a second instead of 3); default: $NCBI_API_KEY."})
    download_dir: str | None = field(default=None, metadata={
        "help": "Where fetched batches are kept as raw XML (batch_00000.xml, ...) with the search (search.json); "
                "the same command again resumes there."})
    max_records: int | None = field(default=None, metadata={
        "help": "Fetch at most this many records (PubMed's esearch gives at most the first 10,000)."})
    batch_size: int = field(default=200, metadata={"help": "Records per efetch request and batch file."})
    max_tries: int = field(default=4, metadata={"help": "Tries per request before giving up on transient errors."})
    retry_wait: float = field(default=10.0, metadata={
        "help": "Seconds before the first retry; each further retry waits twice as long."})
    timeout: float = field(default=120.0, metadata={"help": "Seconds before an unanswered request counts as failed."})
    drop_retracted: bool = field(default=True, metadata={"help": "Leave out retracted publications (counted)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_file."})

    def __post_init__(self):
        if not self.input and not self.query:
            raise InputError("nothing to read: pass --input and/or --query")
        at_least(self, "max_records", 1)
        at_least(self, "max_tries", 1)
        require(1 <= self.batch_size <= 10000, "batch_size", "must be between 1 and 10000", self.batch_size)
        require(self.max_records is None or self.max_records <= 10000, "max_records",
                "must be at most 10000, the most PubMed's esearch returns for one query (split the query, e.g. by "
                "date, and combine the outputs)", self.max_records)
        require(self.retry_wait >= 0, "retry_wait", "must not be negative", self.retry_wait)
        require(self.timeout > 0, "timeout", "must be positive", self.timeout)
        self.email = self.email or os.environ.get("NCBI_EMAIL") or None
        self.api_key = self.api_key or os.environ.get("NCBI_API_KEY") or None
        if self.query is not None:
            self.query = self.query.strip()
            require(bool(self.query), "query", "must not be empty", self.query)
            if not self.email:
                raise InputError("--email (or $NCBI_EMAIL) is required with --query: NCBI asks for a contact "
                                 "address with every E-utilities request")
            require("@" in self.email, "email", "must be an e-mail address", self.email)
            if not self.download_dir:
                raise InputError("--download_dir is required with --query: the fetched batches are kept there, "
                                 "so an interrupted download can resume")


@exit_on_input_error
def main(argv=None):
    (args,) = parse_args((PubmedCorpusArguments,), argv)
    setup_logging()
    from medgpt.dataset_tools import Tally, check_jsonl_output
    from medgpt.literature import (LICENCE_NOTE, FetchRequest, articles_from_files, build_corpus,
                                   fetch_pubmed, pubmed_files)
    from medgpt.outputs import check_apart_from_inputs, check_output_dir, write_jsonl

    files = pubmed_files(args.input)
    check_jsonl_output(args.output_file, args.overwrite, files, inputs=args.input)
    if args.query:
        check_output_dir(args.download_dir, "--download_dir")
        # The batches fetched there would be read again as files of the --input folder.
        check_apart_from_inputs(args.download_dir, [("--input", path) for path in args.input], "--download_dir")
    logger.info(LICENCE_NOTE)

    if args.query:
        request = FetchRequest(
            query=args.query, email=args.email, api_key=args.api_key, download_dir=args.download_dir,
            max_records=args.max_records, batch_size=args.batch_size, max_tries=args.max_tries,
            retry_wait=args.retry_wait, timeout=args.timeout,
        )
        files += fetch_pubmed(request)

    report = Tally("PubMed", unit="articles")
    records = build_corpus(articles_from_files(files), report, drop_retracted=args.drop_retracted)
    report.log()
    if not records:
        raise InputError("no article was kept (see the report above): nothing written", args.output_file)
    write_jsonl(args.output_file, records)
    logger.info("wrote %d articles to %s", len(records), args.output_file)


if __name__ == "__main__":
    main()
