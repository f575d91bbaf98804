{{- define "mesh-operator.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mesh-operator.labels" -}}
app.kubernetes.io/name: mesh-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mesh-operator.selector" -}}
app.kubernetes.io/name: mesh-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* What the operator may do to MeshPolicies, Pods and Events in a namespace it watches. */}}
{{- define "mesh-operator.namespacedRules" -}}
- apiGroups: [agentmesh.dev]
  resources: [meshpolicies]
  verbs: [get, list, watch, patch, update]
- apiGroups: [agentmesh.dev]
  resources: [meshpolicies/status]
  verbs: [get, patch, update]
- apiGroups: [agentmesh.dev]
  resources: [meshpolicies/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
