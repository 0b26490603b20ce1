/* Every drop reason the datapath emits, in one place: Cilium's codes and macro names (positive
 * here; Cilium's C uses negatives), so a drop reads as it would in Hubble.
 * shared/reasons.py names the same codes (DATAPATH_DROPS) and Cilium's text for each;
 * tests/unit/test_drop_reasons.py fails when the two differ or a DROP_ is defined elsewhere. */
#ifndef MEMBRANE_DROP_REASONS_H
#define MEMBRANE_DROP_REASONS_H

#define DROP_INVALID_SIP 132
#define DROP_POLICY 133
#define DROP_INVALID 134
#define DROP_CT_INVALID_HDR 135
#define DROP_UNSUPPORTED_L3 139
#define DROP_NO_TUNNEL_KEY 147
#define DROP_UNKNOWN_TARGET 150
#define DROP_NO_SERVICE 158
#define DROP_NO_CONFIG 165
#define DROP_NAT_NO_MAPPING 167
#define DROP_ENCAP_PROHIBITED 170
#define DROP_INVALID_IDENTITY 171
#define DROP_UNKNOWN_SENDER 172
#define DROP_FRAG_NOT_FOUND 175
#define DROP_PROXY_LOOKUP_FAILED 178
#define DROP_PROXY_SET_FAILED 179
#define DROP_PROXY_UNSUPPORTED 180
#define DROP_POLICY_DENY 181
#define DROP_INVALID_VNI 183
#define DROP_EP_NOT_READY 203

#endif
