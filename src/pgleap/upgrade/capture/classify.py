"""What a statement does to a transaction and to data, decided from its text with pglast.

The capture path asks this for every statement it sees, so results are cached by text.
When the text cannot be parsed (old syntax such as `WITH OIDS`, or a dialect pglast's
PostgreSQL 17 grammar rejects) the statement counts as a write: capturing a read costs a
little, missing a write loses data.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.enums import (
    DropBehavior,
    GrantTargetType,
    LockWaitPolicy,
    ObjectType,
    SQLValueFunctionOp,
    TransactionStmtKind,
)
from pglast.parser import ParseError
from pglast.visitors import Ancestor, Visitor

_CACHE_SIZE = 16_384
# By whole text: simple-protocol texts differ in their literals, so few repeat, and each entry is a few objects
# the garbage collector walks at every full collection. Their templates are cached in the large cache.
_TEXT_CACHE_SIZE = 1_024


class Kind(enum.StrEnum):
    """The role a statement plays for capture."""

    READ = "read"  # cannot change data
    WRITE = "write"  # changes rows (DML, COPY FROM, SELECT INTO, EXPLAIN ANALYZE of DML)
    MAYBE_WRITE = "maybe_write"  # calls functions that might write: captured, the probe decides
    DDL = "ddl"  # changes the schema
    SESSION = "session"  # changes session state (SET, RESET, DISCARD, PREPARE, LISTEN...)
    BEGIN = "begin"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    SAVEPOINT = "savepoint"
    RELEASE = "release"
    ROLLBACK_TO = "rollback_to"
    TWO_PHASE = "two_phase"  # PREPARE TRANSACTION / COMMIT PREPARED / ROLLBACK PREPARED
    UTILITY = "utility"  # changes no data a target needs (VACUUM, ANALYZE, CHECKPOINT, LOCK...)


@dataclass(frozen=True)
class StatementInfo:
    """One statement of a query string, classified."""

    kind: Kind
    command: str  # the parse node, e.g. "InsertStmt"; "Unparseable" when pglast failed
    text: str  # this statement's own text within the query string
    relations: tuple[str, ...] = ()  # relations it writes, as written in the statement
    savepoint: str | None = None
    setting: tuple[str, bool] | None = None  # (name, SET LOCAL?) for SET/RESET
    start: int = 0  # character offset of the statement within its query string
    refuses_block: bool = False  # cannot run inside a transaction block (CREATE DATABASE, ... CONCURRENTLY)
    temporary: bool = False  # creates a temporary object: session state, not the schema the target must hold
    # Table names (unqualified) whose columns, rules or privileges this statement may change; None: any table.
    reshapes: tuple[str, ...] | None = ()
    chain: bool = False  # COMMIT/ROLLBACK AND CHAIN: a new explicit transaction begins at once
    # A write that, run again on the target, may change other values or other rows than on the source
    # (volatile functions, the session's user, rows picked by LIMIT without ORDER BY, ctid, SKIP LOCKED...).
    unrepeatable: bool = False
    # Functions a write calls that capture knows nothing of (a user's, most often): replay flags its tables
    # when the target has a volatile function of that name. For a SELECT that may write: every function it
    # calls that is not read-only.
    calls: tuple[str, ...] = ()

    def with_text(self, text: str, start: int) -> StatementInfo:
        """The same classification for another text of the same template (its literals differ)."""
        # dataclasses.replace() looks up every field each time; this runs for every simple-protocol statement.
        copy = object.__new__(StatementInfo)
        copy.__dict__.update(self.__dict__, text=text, start=start)
        return copy

    @property
    def changes_schema(self) -> bool:
        """DDL that changes what the target's schema must hold (the `ddl` setting governs it)."""
        return self.kind is Kind.DDL and not self.temporary and self.command != "TruncateStmt"

    @property
    def writes(self) -> bool:
        """Whether capture must keep this statement for replay."""
        return self.kind in (Kind.WRITE, Kind.MAYBE_WRITE, Kind.DDL)


# Functions that read but never write: a SELECT calling only these is a read. Anything else
# might write (user functions, nextval, setval, lo_*, dblink...).
READ_ONLY_FUNCTIONS = frozenset(
    """
    abs age array_agg array_length array_position array_to_string avg bool_and bool_or btrim ceil ceiling
    char_length character_length clock_timestamp coalesce concat concat_ws count current_database
    current_schema current_setting date_part date_trunc decode encode every exp extract floor format
    generate_series greatest initcap json_agg json_build_array json_build_object jsonb_agg
    jsonb_build_array jsonb_build_object jsonb_set least left length ln log lower lpad ltrim make_date
    make_interval make_timestamp max md5 min mod now nullif octet_length overlaps pg_backend_pid pg_sleep
    position power quote_ident quote_literal random rank regexp_match regexp_replace regexp_split_to_array
    repeat replace reverse right round row_number rpad rtrim sign split_part sqrt statement_timestamp
    string_agg strpos substr substring sum timeofday to_char to_date to_json to_jsonb to_number
    to_timestamp transaction_timestamp translate trim trunc txid_current txid_current_snapshot
    txid_snapshot_xmax txid_snapshot_xmin txid_visible_in_snapshot unnest upper version dense_rank
    lag lead first_value last_value ntile percent_rank cume_dist stddev variance array_remove
    array_append array_prepend array_cat cardinality pg_get_serial_sequence hashtext hashtextextended
    """.split()
)

# Functions that change something other than a table's rows (sequences, settings, locks, notifications,
# large objects): a `SELECT nextval(...)` writes no table a re-sync must look at. UNREPEATABLE_FUNCTIONS
# write none either.
WRITES_NO_TABLE = frozenset(
    """
    nextval setval set_config pg_advisory_lock pg_advisory_xact_lock pg_advisory_lock_shared
    pg_advisory_xact_lock_shared pg_try_advisory_lock pg_try_advisory_xact_lock pg_try_advisory_lock_shared
    pg_try_advisory_xact_lock_shared pg_advisory_unlock pg_advisory_unlock_shared pg_advisory_unlock_all
    pg_notify lo_create lo_creat lo_unlink lo_import lo_export lo_from_bytea lo_put lo_open lo_close lowrite
    """.split()
)

_WRITE_NODES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_SESSION_NODES = tuple(
    getattr(ast, name)
    for name in (
        "VariableSetStmt",
        "DiscardStmt",
        "PrepareStmt",
        "DeallocateStmt",
        "ListenStmt",
        "UnlistenStmt",
        "DeclareCursorStmt",
        "ClosePortalStmt",
        "FetchStmt",
        "LoadStmt",
    )
    if hasattr(ast, name)
)
_READ_NODES = tuple(getattr(ast, n) for n in ("VariableShowStmt", "ExplainStmt", "NotifyStmt") if hasattr(ast, n))
_UTILITY_NODES = tuple(
    getattr(ast, n)
    for n in ("VacuumStmt", "CheckPointStmt", "LockStmt", "ReindexStmt", "ClusterStmt")
    if hasattr(ast, n)
)
_TRANSACTION_KINDS = {
    TransactionStmtKind.TRANS_STMT_BEGIN: Kind.BEGIN,
    TransactionStmtKind.TRANS_STMT_START: Kind.BEGIN,
    TransactionStmtKind.TRANS_STMT_COMMIT: Kind.COMMIT,
    TransactionStmtKind.TRANS_STMT_ROLLBACK: Kind.ROLLBACK,
    TransactionStmtKind.TRANS_STMT_SAVEPOINT: Kind.SAVEPOINT,
    TransactionStmtKind.TRANS_STMT_RELEASE: Kind.RELEASE,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: Kind.ROLLBACK_TO,
    TransactionStmtKind.TRANS_STMT_PREPARE: Kind.TWO_PHASE,
    TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED: Kind.TWO_PHASE,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED: Kind.TWO_PHASE,
}


# Values a statement computes that the target computes otherwise (now() and friends are pinned instead).
UNREPEATABLE_FUNCTIONS = frozenset(
    """
    random clock_timestamp timeofday statement_timestamp gen_random_uuid uuid_generate_v1 uuid_generate_v1mc
    uuid_generate_v4 uuidv4 uuidv7 nextval currval lastval txid_current pg_current_xact_id pg_backend_pid
    inet_client_addr inet_client_port inet_server_addr pg_postmaster_start_time
    """.split()
)
_USER_VALUES = frozenset(
    {
        SQLValueFunctionOp.SVFOP_CURRENT_ROLE,
        SQLValueFunctionOp.SVFOP_CURRENT_USER,
        SQLValueFunctionOp.SVFOP_USER,
        SQLValueFunctionOp.SVFOP_SESSION_USER,
    }
)


class _Scan(Visitor):
    """Collects what a statement tree contains that matters for capture."""

    def __init__(self, *, top: bool = True) -> None:
        self.functions: list[str] = []
        self.writes: list[str] = []
        self.relations: list[str] = []  # every RangeVar: written, read, or only named
        self.only_named: list[str] = []  # RangeVars that read nothing written: FOR UPDATE OF's, RETURNING's
        self.ctes: set[str] = set()
        self.cte_reads = False  # a WITH query reads a table (its name may hide the table's outside)
        self.top = top  # the statement itself, whose RETURNING rows go to the client
        self.unrepeatable = False

    def reads_tables(self) -> bool:
        """Whether it reads a table besides the rows it writes (a subquery, FROM, USING; its own table too)."""
        left = Counter(self.relations)
        left.subtract(self.writes)  # each write target appears once as a RangeVar of its own
        left.subtract(self.only_named)
        return self.cte_reads or any(n > 0 for name, n in left.items() if name not in self.ctes)

    def visit_RangeVar(self, _ancestors: object, node: ast.RangeVar) -> None:
        self.relations.append(_relation_name(node))

    def _returning(
        self, ancestors: Ancestor, node: ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt
    ) -> None:
        returning = node.returningClause
        if returning is not None and self.top and ancestors.parent is None:
            # The client's rows: their subqueries change nothing written. A WITH query's RETURNING feeds the rest.
            inner = _Scan(top=False)
            inner(returning)
            named = Counter(inner.relations)
            named.subtract(inner.only_named)  # FOR UPDATE OF in there: this scan's SelectStmt counts it too
            self.only_named += named.elements()

    def visit_WithClause(self, _ancestors: object, node: ast.WithClause) -> None:
        for cte in node.ctes or ():
            if not isinstance(cte, ast.CommonTableExpr) or cte.ctequery is None:
                continue
            name = cte.ctename or ""
            inner = _Scan(top=False)
            inner.ctes |= self.ctes  # the WITH queries before it
            if node.recursive:
                inner.ctes.add(name)  # WITH RECURSIVE reads itself; otherwise its name there is the table
            inner(cte.ctequery)
            self.cte_reads = self.cte_reads or inner.reads_tables()
            self.ctes.add(name)

    def visit_FuncCall(self, _ancestors: object, node: ast.FuncCall) -> None:
        if node.funcname:
            name = node.funcname[-1].sval.lower()
            self.functions.append(name)
            self.unrepeatable = self.unrepeatable or name in UNREPEATABLE_FUNCTIONS

    def visit_SQLValueFunction(self, _ancestors: object, node: ast.SQLValueFunction) -> None:
        if node.op in _USER_VALUES:  # replay logs in as its own role
            self.unrepeatable = True

    def visit_SelectStmt(self, _ancestors: object, node: ast.SelectStmt) -> None:
        limit, offset = node.limitCount, node.limitOffset
        # Which rows is the server's choice. OFFSET 0 (an old planner fence) counts too: the template a statement
        # is classified by has every number as 0.
        if not node.sortClause and any(n is not None and not _is_null(n) for n in (limit, offset)):
            self.unrepeatable = True
        if any(c.waitPolicy == LockWaitPolicy.LockWaitSkip for c in node.lockingClause or ()):
            self.unrepeatable = True  # SKIP LOCKED: which rows depends on what others held then
        self.only_named += [_relation_name(r) for c in node.lockingClause or () for r in c.lockedRels or ()]

    def visit_RangeTableSample(self, _ancestors: object, node: ast.RangeTableSample) -> None:
        self.unrepeatable = True

    def visit_ColumnRef(self, _ancestors: object, node: ast.ColumnRef) -> None:
        last = node.fields[-1] if node.fields else None
        if isinstance(last, ast.String) and last.sval == "ctid":  # a copy lays rows out anew
            self.unrepeatable = True

    def visit_InsertStmt(self, ancestors: Ancestor, node: ast.InsertStmt) -> None:
        self.writes.append(_relation_name(node.relation))
        self._returning(ancestors, node)

    def visit_UpdateStmt(self, ancestors: Ancestor, node: ast.UpdateStmt) -> None:
        self.writes.append(_relation_name(node.relation))
        self._returning(ancestors, node)

    def visit_DeleteStmt(self, ancestors: Ancestor, node: ast.DeleteStmt) -> None:
        self.writes.append(_relation_name(node.relation))
        self._returning(ancestors, node)

    def visit_MergeStmt(self, ancestors: Ancestor, node: ast.MergeStmt) -> None:
        # Without its target, re-sync flags and the copy stitch (a table copied at its own snapshot) miss it.
        self.writes.append(_relation_name(node.relation))
        self._returning(ancestors, node)


def _write(command: str, text: str, scan: _Scan) -> StatementInfo:
    unknown = (f for f in scan.functions if f not in READ_ONLY_FUNCTIONS and f not in UNREPEATABLE_FUNCTIONS)
    return StatementInfo(
        Kind.WRITE,
        command,
        text,
        tuple(dict.fromkeys(scan.writes)),
        # A statement reading a table sees the rows of its own snapshot, but replay in commit order runs it after
        # every transaction that committed before its own: one that committed meanwhile is seen there.
        unrepeatable=scan.unrepeatable or scan.reads_tables(),
        calls=tuple(dict.fromkeys(unknown)),
    )


def _is_null(node: ast.Node) -> bool:
    """LIMIT ALL (and LIMIT NULL): no limit at all."""
    return isinstance(node, ast.A_Const) and bool(node.isnull)


def _relation_name(rangevar: ast.RangeVar | None) -> str:
    if rangevar is None:
        return ""
    return ".".join(p for p in (rangevar.schemaname, rangevar.relname) if p)


def _scan(node: ast.Node) -> _Scan:
    scan = _Scan()
    scan(node)
    return scan


def _classify_node(node: ast.Node, text: str) -> StatementInfo:
    command = type(node).__name__
    if isinstance(node, ast.TransactionStmt):
        kind = _TRANSACTION_KINDS[TransactionStmtKind(node.kind or 0)]
        return StatementInfo(kind, command, text, savepoint=node.savepoint_name, chain=bool(node.chain))
    if isinstance(node, _WRITE_NODES):
        return _write(command, text, _scan(node))
    if isinstance(node, ast.CopyStmt):
        if node.is_from:
            return StatementInfo(Kind.WRITE, command, text, (_relation_name(node.relation),))
        return StatementInfo(Kind.READ, command, text)
    if isinstance(node, ast.SelectStmt):
        return _classify_select(node, command, text)
    if isinstance(node, ast.ExplainStmt):
        analyze = any(opt.defname == "analyze" for opt in node.options or ())
        inner = _classify_node(node.query, text) if node.query is not None else None
        if analyze and inner is not None and inner.writes:  # EXPLAIN ANALYZE runs the statement
            return StatementInfo(inner.kind, command, text, inner.relations)
        return StatementInfo(Kind.READ, command, text)
    if isinstance(node, ast.VariableSetStmt):
        return StatementInfo(Kind.SESSION, command, text, setting=(node.name or "", bool(node.is_local)))
    if isinstance(node, ast.ConstraintsSetStmt):
        # Holds to the end of its transaction, like SET LOCAL: replayed with it (a deferred foreign key
        # checked at once on the target would refuse rows the source accepted).
        return StatementInfo(Kind.SESSION, command, text, setting=("constraints", True))
    if isinstance(node, _SESSION_NODES):
        return StatementInfo(Kind.SESSION, command, text)
    if isinstance(node, _READ_NODES):
        return StatementInfo(Kind.READ, command, text)
    if isinstance(node, _UTILITY_NODES):
        return StatementInfo(Kind.UTILITY, command, text)
    if isinstance(node, (ast.CallStmt, ast.DoStmt, ast.ExecuteStmt)):
        return StatementInfo(Kind.MAYBE_WRITE, command, text)
    if isinstance(node, ast.TruncateStmt):
        # DDL, though no schema change (`ddl` leaves it alone); it empties tables a skip must flag and the copy
        # stitch must place.
        # CASCADE empties tables it does not name: "" stands for them.
        names = [_relation_name(r) for r in node.relations or ()]
        if node.behavior == DropBehavior.DROP_CASCADE:
            names.append("")
        return StatementInfo(Kind.DDL, command, text, tuple(dict.fromkeys(names)), reshapes=())
    # CREATE/ALTER/DROP/GRANT/COMMENT... all change what the target must hold.
    return _ddl(node, command, text)


def _temporary_name(node: ast.Node) -> str | None:
    """The name of the temporary relation a CREATE (or SELECT INTO) makes; None when it makes no temporary one."""
    into = getattr(node, "into", None) or getattr(node, "intoClause", None)
    rel = getattr(into, "rel", None) or next(
        (getattr(node, a) for a in ("relation", "view", "sequence") if getattr(node, a, None) is not None), None
    )
    return rel.relname if isinstance(rel, ast.RangeVar) and rel.relpersistence == "t" else None


def _ddl(node: ast.Node, command: str, text: str) -> StatementInfo:
    name = _temporary_name(node)
    return StatementInfo(
        Kind.DDL, command, text, (name,) if name else (), temporary=name is not None, reshapes=_reshapes(node)
    )


# DDL that cannot change an existing table's columns, rules, row security or privileges.
_SHAPE_NEUTRAL = tuple(
    getattr(ast, n)
    for n in (
        "IndexStmt",
        "CommentStmt",
        "CreateFunctionStmt",
        "ViewStmt",
        "CreateTrigStmt",
        "CreateSeqStmt",
        "AlterSeqStmt",
        "CreateEnumStmt",
        "CreateDomainStmt",
        "CompositeTypeStmt",
        "DefineStmt",
        "TruncateStmt",
        "CreateSchemaStmt",
        "SecLabelStmt",
    )
    if hasattr(ast, n)
)
_TABLE_OBJECTS = (ObjectType.OBJECT_TABLE, ObjectType.OBJECT_FOREIGN_TABLE, ObjectType.OBJECT_VIEW)


def _reshapes(node: ast.Node) -> tuple[str, ...] | None:
    """The table names whose shape a DDL statement may change, None when it cannot be told (any table)."""
    if isinstance(node, _SHAPE_NEUTRAL):
        return ()
    if isinstance(node, (ast.AlterTableStmt, ast.RuleStmt, ast.CreateStmt)):
        return (node.relation.relname,) if node.relation is not None and node.relation.relname else None
    if isinstance(node, (ast.CreatePolicyStmt, ast.AlterPolicyStmt)):
        return (node.table.relname,) if node.table is not None and node.table.relname else None
    if isinstance(node, ast.CreateTableAsStmt):
        rel = node.into.rel if node.into is not None else None
        return (rel.relname,) if rel is not None and rel.relname else None
    if isinstance(node, ast.RenameStmt) and node.relation is not None and node.relation.relname:
        return tuple(n for n in (node.relation.relname, node.newname) if n)
    if isinstance(node, ast.DropStmt) and node.removeType in _TABLE_OBJECTS:
        return tuple(obj[-1].sval or "" for obj in node.objects or () if obj and isinstance(obj[-1], ast.String))
    if (
        isinstance(node, ast.GrantStmt)
        and node.targtype == GrantTargetType.ACL_TARGET_OBJECT
        and node.objtype in _TABLE_OBJECTS
    ):
        return tuple(o.relname for o in node.objects or () if isinstance(o, ast.RangeVar) and o.relname)
    return None


def _classify_select(node: ast.SelectStmt, command: str, text: str) -> StatementInfo:
    if node.intoClause is not None:  # SELECT ... INTO creates a table
        return _ddl(node, command, text)
    scan = _scan(node)
    if scan.writes:  # a writable CTE
        return _write(command, text, scan)
    calls = tuple(dict.fromkeys(f for f in scan.functions if f not in READ_ONLY_FUNCTIONS))
    if calls:
        return StatementInfo(Kind.MAYBE_WRITE, command, text, calls=calls)
    return StatementInfo(Kind.READ, command, text)


# Statements PostgreSQL refuses inside a transaction block (or that may end the transaction themselves:
# CALL and DO can COMMIT from 11 on), so capture never wraps them in BEGIN nor appends its probe to them
# (a DO on a source before 11 excepted: Forwarder._refuses_block).
_NO_BLOCK_NODES = tuple(
    getattr(ast, n)
    for n in (
        "CreatedbStmt",
        "DropdbStmt",
        "CreateTableSpaceStmt",
        "DropTableSpaceStmt",
        "AlterSystemStmt",
        "VacuumStmt",
        "ClusterStmt",
        "CallStmt",
        "DoStmt",
        "CreateSubscriptionStmt",
        "DropSubscriptionStmt",
        "AlterSubscriptionStmt",
        "AlterEnumStmt",  # ALTER TYPE ... ADD VALUE: refused in a block before 12
    )
    if hasattr(ast, n)
)


def _refuses_block(node: ast.Node) -> bool:
    if isinstance(node, _NO_BLOCK_NODES):
        return True
    if isinstance(node, (ast.IndexStmt, ast.DropStmt)):
        return bool(node.concurrent)
    if isinstance(node, ast.ReindexStmt):
        return any(getattr(p, "defname", "") == "concurrently" for p in node.params or ()) or bool(
            getattr(node, "concurrent", False)
        )
    return False


# Literals, for the template a one-statement string is cached under: quoted strings, then numbers (two
# substitutions with constant replacements: a callback per literal cost more than the rest of classify).
_STRINGS = re.compile(r"'(?:[^']|'')*'")
_NUMBERS = re.compile(r"\b\d+(?:\.\d*)?(?:[eE][+-]?\d+)?\b")
# Where a literal cannot be told from its surroundings by the pattern above, the text is parsed as it is.
_NOT_PLAIN = re.compile(r"""[\\"$]|--|/\*""")


def template(sql: str) -> str | None:
    """`sql` with its literals replaced, when it is one plain statement; None when it is not.

    Simple-protocol clients send literals inline, so the same statement comes with other text every
    time and a cache by text never hits; what a statement does for capture (its kind, the tables it
    writes, what DDL it is) does not depend on its literals. Strings with quoted identifiers, dollar
    quotes, backslashes, comments or several statements are parsed as they are.
    """
    body = sql.strip()
    if body.endswith(";"):
        body = body[:-1]
    if ";" in body or _NOT_PLAIN.search(body):
        return None
    if "'" in body:
        body = _STRINGS.sub("''", body)  # first: a string's digits are not numbers
    return _NUMBERS.sub("0", body)


@lru_cache(maxsize=_TEXT_CACHE_SIZE)
def classify(sql: str) -> tuple[StatementInfo, ...]:
    """Classify every statement of a query string (cached by text, or by template for one plain statement)."""
    shape = template(sql)
    if shape is None:
        return _classify_text(sql)
    infos = _classify_text(shape)
    if len(infos) != 1 or infos[0].command == "Unparseable":
        return _classify_text(sql)
    text = sql.strip()
    if text.endswith(";"):
        text = text[:-1].rstrip()
    return (infos[0].with_text(text, len(sql) - len(sql.lstrip())),)


@lru_cache(maxsize=_CACHE_SIZE)
def _classify_text(sql: str) -> tuple[StatementInfo, ...]:
    try:
        raw = parse_sql(sql)
    except ParseError:
        return (StatementInfo(Kind.WRITE, "Unparseable", sql),)
    if not raw:
        return ()
    infos = []
    for stmt in raw:
        # pglast gives character offsets (it converts libpg_query's byte offsets); 0 length = to the end.
        start = stmt.stmt_location or 0
        end = start + stmt.stmt_len if stmt.stmt_len else len(sql)
        if stmt.stmt is not None:
            info = _classify_node(stmt.stmt, sql[start:end].strip())
            infos.append(
                replace(
                    info,
                    start=start + len(sql[start:end]) - len(sql[start:end].lstrip()),
                    refuses_block=_refuses_block(stmt.stmt),
                )
            )
    return tuple(infos)


@lru_cache(maxsize=256)
def copy_is_binary(sql: str) -> bool:
    """Whether `sql` is a COPY in binary format; True too when it cannot be parsed (it cannot be told)."""
    try:
        raw = parse_sql(sql)
    except ParseError:
        return True
    for stmt in raw:
        if isinstance(stmt.stmt, ast.CopyStmt):
            # Every spelling (FORMAT binary, WITH BINARY, the old COPY BINARY t) parses to the option format.
            return any(
                opt.defname == "format" and isinstance(opt.arg, ast.String) and opt.arg.sval == "binary"
                for opt in stmt.stmt.options or ()
            )
    return False
