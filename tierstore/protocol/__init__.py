"""The wire protocol (frames and their codec: :mod:`tierstore.protocol.codec`) and the
frame-serving loop the daemon and the peer server share (:mod:`tierstore.protocol.serve`)."""

from tierstore.protocol.codec import (DEFAULT_MAX_FRAME_BYTES, FLAG_ERROR, FLAG_REPLY, HEADER_BYTES,
                                      PROTOCOL_VERSION, FrameError, FrameHeader, MsgType,
                                      decode_body, decode_header, encode_frame, pack_keys,
                                      read_frame, unpack_keys, write_frame)

__all__ = ["DEFAULT_MAX_FRAME_BYTES", "FLAG_ERROR", "FLAG_REPLY", "HEADER_BYTES", "PROTOCOL_VERSION",
           "FrameError", "FrameHeader", "MsgType", "decode_body", "decode_header", "encode_frame",
           "pack_keys", "read_frame", "unpack_keys", "write_frame"]
