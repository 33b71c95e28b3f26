"""Protocol constants: request codes, message type bytes and SQLSTATEs pgleap uses."""

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

# Frontend message types.
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
EXECUTE = ord("E")
DESCRIBE = ord("D")
CLOSE = ord("C")
SYNC = ord("S")
FLUSH = ord("H")
FUNCTION_CALL = ord("F")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
TERMINATE = ord("X")
PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse

FRONTEND_TYPES = frozenset(
    [
        QUERY,
        PARSE,
        BIND,
        EXECUTE,
        DESCRIBE,
        CLOSE,
        SYNC,
        FLUSH,
        FUNCTION_CALL,
        COPY_DATA,
        COPY_DONE,
        COPY_FAIL,
        TERMINATE,
    ]
)
# Each of these makes the server answer with exactly one ReadyForQuery.
REQUESTS_READY = frozenset([QUERY, SYNC, FUNCTION_CALL])

# Backend message types.
AUTHENTICATION = ord("R")
PARAMETER_STATUS = ord("S")
BACKEND_KEY_DATA = ord("K")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NOTIFICATION_RESPONSE = ord("A")
COMMAND_COMPLETE = ord("C")
ROW_DESCRIPTION = ord("T")
DATA_ROW = ord("D")
NO_DATA = ord("n")
PORTAL_SUSPENDED = ord("s")
COPY_IN_RESPONSE = ord("G")
NEGOTIATE_PROTOCOL_VERSION = ord("v")

# Authentication request codes.
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# SQLSTATEs.
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
SQLCLIENT_UNABLE_TO_ESTABLISH = "08001"
INVALID_PASSWORD = "28P01"
INVALID_AUTHORIZATION = "28000"
INVALID_CATALOG_NAME = "3D000"
TOO_MANY_CONNECTIONS = "53300"
ADMIN_SHUTDOWN = "57P01"
FEATURE_NOT_SUPPORTED = "0A000"
SYNTAX_ERROR = "42601"
QUERY_CANCELED = "57014"

# The first OID of objects users create (FirstNormalObjectId): type OIDs from here on differ between servers.
FIRST_USER_OID = 16384
