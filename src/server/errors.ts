import type { ZodError } from 'zod';

/** An error the API reports to the client in OpenAI's shape. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type = 'invalid_request_error',
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }

  body(): OpenAIErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

export interface OpenAIErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

export const badRequest = (message: string, param: string | null = null, code: string | null = null) =>
  new ApiError(400, message, 'invalid_request_error', param, code);

export const serverError = (message: string) => new ApiError(500, message, 'server_error', null, 'internal_error');

/** `messages[0].content` from a zod issue path. */
export function paramOf(path: readonly PropertyKey[]): string | null {
  let out = '';
  for (const p of path) out += typeof p === 'number' ? `[${p}]` : `${out ? '.' : ''}${String(p)}`;
  return out || null;
}

/** The first issue of a failed validation, as a 400 naming the parameter. */
export function fromZod(error: ZodError): ApiError {
  const issue = error.issues[0];
  const param = paramOf(issue.path);
  const message = param ? `Invalid value for '${param}': ${issue.message}` : issue.message;
  return badRequest(message, param, 'invalid_value');
}

/** Maps body-parser's errors (they carry `type` and `status`) to API errors. */
export function fromBodyParser(err: { type?: unknown; status?: unknown; message?: string; limit?: unknown; code?: unknown; expose?: unknown }): ApiError | undefined {
  switch (err.type) {
    case 'entity.too.large':
      return new ApiError(413, `The request body exceeds the limit of ${err.limit} bytes.`, 'invalid_request_error', null, 'request_too_large');
    case 'entity.parse.failed':
      return badRequest(`We could not parse the JSON body of your request: ${err.message}`, null, 'invalid_json');
    case 'encoding.invalid_utf8':
      return badRequest('The request body is not valid UTF-8.', null, 'invalid_encoding');
    case 'charset.unsupported':
    case 'encoding.unsupported':
      return new ApiError(415, err.message ?? 'unsupported encoding', 'invalid_request_error', null, 'unsupported_encoding');
    case 'request.aborted':
    case 'request.size.invalid':
      return badRequest(err.message ?? 'the request body was incomplete', null, 'invalid_body');
    default:
      // zlib / brotli errors while inflating a Content-Encoding body, and other client errors Express marks
      // as safe to show (http-errors' `expose`: a URI that does not decode, for instance).
      if (typeof err.code === 'string' && (err.code.startsWith('Z_') || err.code.startsWith('ERR__ERROR_'))) {
        return badRequest('The request body could not be decompressed as its Content-Encoding says.', null, 'invalid_encoding');
      }
      if (typeof err.status === 'number' && err.status >= 400 && err.status < 500 && (err as { expose?: unknown }).expose === true) {
        return new ApiError(err.status, err.message || 'bad request', 'invalid_request_error', null, 'invalid_request');
      }
      return undefined;
  }
}
